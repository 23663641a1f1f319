#!/usr/bin/env bash
# The muxd demo: builds the binaries, starts a dev SMP relay and a daemon on a private socket,
# lets two apps (alice and bob) create queues and exchange messages through them with muxctl,
# shows the status with the upstream connection, writes a sealed backup of the store, and stops
# everything. Everything stays on this machine (127.0.0.1 and a temp directory, which also
# holds the daemon's store and key file).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building muxd, muxctl and smp-devrelay"
cargo build --quiet --locked -p muxd -p muxctl -p smp-devrelay
bin=target/debug

work=$(mktemp -d)
sock="$work/muxd.sock"
state="$work/state"
daemon_pid=""
relay_pid=""
stop() {
    local pid=$1
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}
cleanup() {
    stop "$daemon_pid"
    stop "$relay_pid"
    rm -rf "$work"
}
trap cleanup EXIT

echo "== starting smp-devrelay"
"$bin/smp-devrelay" --listen 127.0.0.1:0 --log-level warn >"$work/relay.out" &
relay_pid=$!
server=""
for _ in $(seq 200); do
    server=$(head -n 1 "$work/relay.out" 2>/dev/null || true)
    [[ "$server" == smp://* ]] && break
    kill -0 "$relay_pid" 2>/dev/null || { echo "smp-devrelay exited" >&2; exit 1; }
    sleep 0.05
done
[[ "$server" == smp://* ]] || { echo "smp-devrelay printed no address" >&2; exit 1; }
echo "relay: $server"

echo "== muxd init (the store and its key file, in a temp data dir)"
XDG_CONFIG_HOME="$work/config" "$bin/muxd" init --data-dir "$state"
echo

echo "== starting muxd on $sock"
XDG_CONFIG_HOME="$work/config" "$bin/muxd" run --data-dir "$state" --socket "$sock" --log-level warn &
daemon_pid=$!
for _ in $(seq 100); do
    [[ -S "$sock" ]] && break
    sleep 0.05
done
[[ -S "$sock" ]] || { echo "muxd did not start" >&2; exit 1; }

echo "== muxctl status"
"$bin/muxctl" --socket "$sock" status
echo
echo "== muxctl ping -c 3"
"$bin/muxctl" --socket "$sock" ping -c 3
echo

alice() { "$bin/muxctl" --socket "$sock" --app alice "$@"; }
bob() { "$bin/muxctl" --socket "$sock" --app bob "$@"; }
# `queue create` prints "queue id:  <id>" and "queue uri: <uri>".
field() { sed -n "s/^$1: *//p"; }

echo "== alice and bob create a queue each on the relay"
alice_q=$(alice queue create "$server")
bob_q=$(bob queue create "$server")
alice_id=$(field "queue id" <<<"$alice_q")
alice_uri=$(field "queue uri" <<<"$alice_q")
bob_id=$(field "queue id" <<<"$bob_q")
bob_uri=$(field "queue uri" <<<"$bob_q")
echo "alice: $alice_id"
echo "bob:   $bob_id"
echo

echo "== they exchange messages (each sends to the other's queue URI)"
# `send` answers as soon as the message is durably stored ("queued <id>"); --wait answers
# once the server has accepted it ("sent <id>").
first=$(bob send "$alice_uri" "hi alice, this is bob")
echo "$first"
first_id=${first#* }
bob send "$alice_uri" "are you there?"
alice send --wait "$bob_uri" "hi bob! yes, through muxd"
echo

echo "== alice: muxctl recv --count 2"
alice recv "$alice_id" --count 2 --timeout 10
echo "== bob: muxctl recv --count 1"
bob recv "$bob_id" --count 1 --timeout 10
echo "== bob: muxctl message status $first_id (bob's first message, now delivered)"
bob message status "$first_id"
echo

echo "== muxctl status (one upstream connection carries both apps' queues)"
"$bin/muxctl" --socket "$sock" status
echo
echo "== muxctl export (a sealed backup; muxd restore --from brings it back)"
"$bin/muxctl" --socket "$sock" export "$work/backup.muxd"
echo
echo "== muxctl shutdown"
"$bin/muxctl" --socket "$sock" shutdown
wait "$daemon_pid"
status=$?
daemon_pid=""
echo "muxd exited with status $status"
