# Shared settings of Switchyard's scripts; sourced, not run.
# Everything installed or built goes under SWITCHYARD_CACHE, outside the clone, so a
# fresh clone on the same machine reuses it.
SWITCHYARD_CACHE="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SWITCHYARD_CACHE/target}"
NATS_SERVER_VERSION="2.15.1"
NATS_SERVER_DIR="$SWITCHYARD_CACHE/nats-server-$NATS_SERVER_VERSION"
export SWITCHYARD_NATS_SERVER="${SWITCHYARD_NATS_SERVER:-$NATS_SERVER_DIR/bin/nats-server}"
KAFKA_VERSION="4.1.1"
KAFKA_DIR="$SWITCHYARD_CACHE/kafka-$KAFKA_VERSION"
# The broker's jars (Apache Kafka from Maven Central); tests run `java -cp "$SWITCHYARD_KAFKA_LIB/*"`.
export SWITCHYARD_KAFKA_LIB="${SWITCHYARD_KAFKA_LIB:-$KAFKA_DIR/lib}"
# The S3-compatible store of the object-store tests: versitygw, built from its Go module.
VERSITYGW_VERSION="1.8.0"
VERSITYGW_DIR="$SWITCHYARD_CACHE/versitygw-$VERSITYGW_VERSION"
export SWITCHYARD_S3_SERVER="${SWITCHYARD_S3_SERVER:-$VERSITYGW_DIR/bin/versitygw}"
# AWS's Lambda runtime interface clients, for the managed-function tests: Python's
# awslambdaric (PyPI) in a virtualenv of its own.
AWSLAMBDARIC_VERSION="4.2.2"
# AWS's Powertools for Lambda (Python), beside it: the tests' handlers parse what
# they receive with its event source data classes, the conformance oracle of the
# AWS-shaped payloads.
POWERTOOLS_VERSION="3.37.0"
LAMBDA_PYTHON_DIR="$SWITCHYARD_CACHE/awslambdaric-$AWSLAMBDARIC_VERSION-powertools-$POWERTOOLS_VERSION"
export SWITCHYARD_LAMBDA_PYTHON="${SWITCHYARD_LAMBDA_PYTHON:-$LAMBDA_PYTHON_DIR/bin/python}"
# Node.js's aws-lambda-ric (npm; 3.x runs on Node.js 20, 4.x needs 22), built from
# source by its install scripts (autoconf, automake, libtool, cmake, make, g++).
AWS_LAMBDA_RIC_VERSION="3.3.0"
LAMBDA_NODE_DIR="$SWITCHYARD_CACHE/aws-lambda-ric-$AWS_LAMBDA_RIC_VERSION"
export SWITCHYARD_LAMBDA_NODE_RIC="${SWITCHYARD_LAMBDA_NODE_RIC:-$LAMBDA_NODE_DIR/node_modules/.bin/aws-lambda-ric}"
# The Rust example function (examples/lambda-rust, on the lambda_runtime crate), built
# by scripts/test.sh.
export SWITCHYARD_LAMBDA_RUST="${SWITCHYARD_LAMBDA_RUST:-$CARGO_TARGET_DIR/release/lambda-echo}"
# AWS's Lambda Runtime Interface Emulator (Go module), the benchmark's baseline for
# warm invocations (scripts/bench.sh installs it).
RIE_VERSION="v0.0.0-20261030222936-bef5c4ba774d"
RIE_DIR="$SWITCHYARD_CACHE/aws-lambda-rie-$RIE_VERSION"
export SWITCHYARD_LAMBDA_RIE="${SWITCHYARD_LAMBDA_RIE:-$RIE_DIR/bin/aws-lambda-rie}"
# AWS's own clients for the Invoke API tests: boto3 and the AWS CLI (v1, PyPI).
AWSCLI_VERSION="1.46.3"
BOTO3_VERSION="1.44.8"
AWS_CLIENTS_DIR="$SWITCHYARD_CACHE/aws-clients-$AWSCLI_VERSION-$BOTO3_VERSION"
export SWITCHYARD_AWS_PYTHON="${SWITCHYARD_AWS_PYTHON:-$AWS_CLIENTS_DIR/bin/python}"
export SWITCHYARD_AWS_CLI="${SWITCHYARD_AWS_CLI:-$AWS_CLIENTS_DIR/bin/aws}"
# The Standard Webhooks library (PyPI) a function verifies Switchyard's signatures with.
STANDARDWEBHOOKS_VERSION="1.1.0"
WEBHOOK_CLIENTS_DIR="$SWITCHYARD_CACHE/standardwebhooks-$STANDARDWEBHOOKS_VERSION"
export SWITCHYARD_WEBHOOK_PYTHON="${SWITCHYARD_WEBHOOK_PYTHON:-$WEBHOOK_CLIENTS_DIR/bin/python}"
# The SQS-compatible server of the SQS source's tests: ElasticMQ's jars from Maven
# Central; tests run `java -cp "$SWITCHYARD_ELASTICMQ_LIB/*" org.elasticmq.server.Main`.
ELASTICMQ_VERSION="1.7.1"
ELASTICMQ_DIR="$SWITCHYARD_CACHE/elasticmq-$ELASTICMQ_VERSION"
export SWITCHYARD_ELASTICMQ_LIB="${SWITCHYARD_ELASTICMQ_LIB:-$ELASTICMQ_DIR/lib}"
# The official clients the queue tests publish with: pika (RabbitMQ) and paho-mqtt
# (PyPI). boto3 (SQS) is in the AWS clients' virtualenv.
PIKA_VERSION="1.4.4"
PAHO_MQTT_VERSION="2.2.0"
QUEUE_CLIENTS_DIR="$SWITCHYARD_CACHE/queue-clients-pika-$PIKA_VERSION-paho-$PAHO_MQTT_VERSION"
export SWITCHYARD_QUEUE_PYTHON="${SWITCHYARD_QUEUE_PYTHON:-$QUEUE_CLIENTS_DIR/bin/python}"
# The tracing backend of the telemetry tests: Jaeger v2 (an OpenTelemetry Collector
# distribution with an OTLP receiver, an in-memory store and a query API), built from
# its Go module.
JAEGER_VERSION="1.75.0"
JAEGER_DIR="$SWITCHYARD_CACHE/jaeger-$JAEGER_VERSION"
export SWITCHYARD_JAEGER="${SWITCHYARD_JAEGER:-$JAEGER_DIR/bin/jaeger}"
# Debian's Chromium and ChromeDriver (packages chromium, chromium-driver), for the web
# console's browser test.
export SWITCHYARD_CHROMEDRIVER="${SWITCHYARD_CHROMEDRIVER:-/usr/bin/chromedriver}"
export SWITCHYARD_CHROMIUM="${SWITCHYARD_CHROMIUM:-/usr/bin/chromium}"
