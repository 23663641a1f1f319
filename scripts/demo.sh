#!/usr/bin/env bash
# The muxd demo: builds the binaries, starts a daemon on a private socket, talks to it with
# muxctl, and stops it. Everything stays on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building muxd and muxctl"
cargo build --quiet --locked -p muxd -p muxctl
bin=target/debug

work=$(mktemp -d)
sock="$work/muxd.sock"
daemon_pid=""
cleanup() {
    if [[ -n "$daemon_pid" ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== starting muxd on $sock"
XDG_CONFIG_HOME="$work/config" "$bin/muxd" run --socket "$sock" --log-level warn &
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
echo "== muxctl shutdown"
"$bin/muxctl" --socket "$sock" shutdown
wait "$daemon_pid"
status=$?
daemon_pid=""
echo "muxd exited with status $status"
