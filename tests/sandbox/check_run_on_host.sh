#!/usr/bin/env bash
# `gorb run` on a host whose kernel has NO IPVS: the supervised system boots inside a
# user-mode-linux guest and the API is relayed to 127.0.0.1. This cannot run inside the sandbox
# (no UML in UML), so it is a script for such a host, as root:
#
#   tests/sandbox/check_run_on_host.sh            # PORT=4673 to use another API port
#
# It starts `gorb run` with every directory under a temp dir, waits for GET /health through the
# relay, checks `gorb ctl status` (supervisorctl through the relayed socket), creates a service
# through the API, stops `gorb run` with SIGTERM and checks the cleanup: exit 0, no namespace, no
# tap, no guest process, relay port and socket closed, the state file written on the host.
# Prints the timings. Exit 0 if every check passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
PORT=${PORT:-4672}
if [ "$(id -u)" != 0 ]; then echo "check: needs root (netns, tap)" >&2; exit 1; fi
if [ -e /proc/net/ip_vs ]; then
  echo "check: this kernel has IPVS, gorb run would not use the guest: nothing to check"; exit 0
fi
work=$(mktemp -d /tmp/gorb-host-check.XXXXXX)
failed=0
check() { if eval "$2"; then echo "ok   $1"; else echo "FAIL $1"; failed=1; fi; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

t0=$(now)
.venv/bin/gorb run -l ":$PORT" --runtime-dir "$work/run" --state-dir "$work/state" \
  --log-dir "$work/log" >"$work/out" 2>&1 &
pid=$!
ns=gorb-$pid

ready=""
for _ in $(seq 1 600); do
  if curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health" | grep -q 200; then
    ready=$(since "$t0"); break
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.2
done
echo "--- gorb run's output so far"; cat "$work/out"; echo "---"
check "banner says IPVS is missing and gorb runs in a user-mode-linux guest" \
  'grep -q "no IPVS" "$work/out" && grep -q "user-mode-linux guest" "$work/out"'
check "netns $ns with tap gt0 while running" 'ip -n "$ns" link show gt0 >/dev/null 2>&1'
check "nothing added to the root namespace" '! ip link show gt0 >/dev/null 2>&1'
check "GET /health through 127.0.0.1:$PORT answers 200 (after ${ready:-never})" '[ -n "$ready" ]'
t1=$(now)
status=$(.venv/bin/gorb ctl --runtime-dir "$work/run" status 2>&1)
echo "$status"
check "gorb ctl status: writer, api, 2 pulse workers and discovery RUNNING ($(since "$t1"))" \
  '[ "$(echo "$status" | grep -c RUNNING)" = 5 ]'
check "plain supervisorctl -c <runtime-dir>/supervisord.conf works too" \
  '.venv/bin/supervisorctl -c "$work/run/supervisord.conf" pid | grep -Eq "^[0-9]+$"'
code=$(curl -s -m 10 -o "$work/put" -w '%{http_code}' -X PUT -H 'Content-Type: application/json' \
  -d '{"host": "10.77.0.100", "port": 80, "protocol": "tcp", "method": "rr"}' \
  "http://127.0.0.1:$PORT/service/web")
check "PUT /service/web through the relay ($code $(cat "$work/put" 2>/dev/null))" '[ "$code" = 200 ]'

t2=$(now)
kill -TERM "$pid"
wait "$pid"; rc=$?
stopped=$(since "$t2")
echo "--- the end of gorb run's output"; tail -n 8 "$work/out"; echo "---"
check "gorb run exited 0 after SIGTERM (in $stopped)" '[ "$rc" = 0 ]'
check "netns $ns removed (the tap with it)" '! ip netns list | grep -qw "$ns"'
check "no guest process left" '! pgrep -f "uml_dir=$work" >/dev/null'
check "relay port $PORT closed" '! curl -s -m 2 -o /dev/null "http://127.0.0.1:$PORT/health"'
check "relayed supervisor.sock removed" '[ ! -e "$work/run/supervisor.sock" ]'
check "state file written on the host by the guest's writer" \
  'grep -q "\"web\"" "$work/state/state.json" 2>/dev/null'
check "the writer stopped cleanly in the guest" 'grep -q "stopped: ipvs-writer (exit status 0)" "$work/log/supervisord.log"'
echo "timings: API ready ${ready:-never} after start; stop took $stopped"
if [ "$failed" = 0 ]; then rm -rf "$work"; echo "all checks passed"; else echo "files kept in $work"; fi
exit "$failed"
