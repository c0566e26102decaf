#!/bin/bash
# usage: rabbitmq-node.sh DIR AMQP_PORT [keep]   (in a process group of its own)
# Runs a private RabbitMQ node (Debian's rabbitmq-server) as plain processes in this
# process group, for the AMQP source's tests: its own epmd on a private port and
# rabbitmq-server -> beam.smp, with its cookie, data, logs and config under DIR (never
# /var/lib/rabbitmq; as root the /usr/sbin wrappers would switch to the rabbitmq
# user, so /usr/lib/rabbitmq/bin is run directly). No plugins; user guest/guest.
# Ports: AMQP_PORT (AMQP), AMQP_PORT+1 (Erlang distribution), AMQP_PORT+2 (epmd),
# all on 127.0.0.1. `keep` keeps DIR's data (a restart).
# Stop: kill -TERM -PGID (about 2 s), then kill -KILL -PGID.
set -eu
D=$1; PORT=$2; KEEP=${3:-}
[ -z "$KEEP" ] && rm -rf "$D"
mkdir -p "$D"/{mnesia,log,home}
NODE="sy-$PORT@localhost"
[ -f "$D/home/.erlang.cookie" ] || { printf 'SYTESTCOOKIE%s' "$PORT" > "$D/home/.erlang.cookie"; chmod 400 "$D/home/.erlang.cookie"; }
cat > "$D/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$PORT
loopback_users = none
default_user = guest
default_pass = guest
CONF
echo '[].' > "$D/enabled_plugins"
: > "$D/rabbitmq-env.conf"
export HOME="$D/home"                       # erlang cookie lives here; never /var/lib/rabbitmq
export RABBITMQ_CONF_ENV_FILE="$D/rabbitmq-env.conf"   # ignore /etc/rabbitmq/rabbitmq-env.conf
export RABBITMQ_NODENAME="$NODE"
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$PORT
export RABBITMQ_DIST_PORT=$((PORT+1))
export ERL_EPMD_PORT=$((PORT+2))
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_MNESIA_BASE="$D/mnesia"
export RABBITMQ_LOG_BASE="$D/log"
export RABBITMQ_CONFIG_FILE="$D/rabbitmq.conf"
export RABBITMQ_ADVANCED_CONFIG_FILE="$D/advanced.config"
export RABBITMQ_ENABLED_PLUGINS_FILE="$D/enabled_plugins"
export RABBITMQ_PID_FILE="$D/rabbit.pid"
export RABBITMQ_LOGS=-
export ERL_CRASH_DUMP="$D/erl_crash.dump"
export RABBITMQ_SCHEDULER_BIND_TYPE=u
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} +S 2:2"
echo "$NODE" > "$D/nodename"
/usr/bin/epmd -port "$ERL_EPMD_PORT" -address 127.0.0.1 &
for i in $(seq 100); do /usr/bin/epmd -port "$ERL_EPMD_PORT" -names >/dev/null 2>&1 && break; sleep 0.05; done
/usr/lib/rabbitmq/bin/rabbitmq-server &
RPID=$!
trap 'kill -TERM $RPID 2>/dev/null; wait $RPID; kill -TERM %1 2>/dev/null; wait' TERM INT
RC=0; wait $RPID || RC=$?
kill -TERM %1 2>/dev/null; wait
exit $RC
