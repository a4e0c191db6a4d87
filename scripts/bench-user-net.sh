#!/usr/bin/env bash
# The default VM's network against QEMU's own user-mode network, side by
# side: a guest downloads and uploads SIZE_MIB from and to a server on the
# host's loopback (reached at the gateway, 10.0.2.2), checked by MD5, in
# ROUNDS rounds that alternate the order. Prints one line per transfer.
#
#   scripts/bench-user-net.sh [ROUNDS] [SIZE_MIB]
#
# "passt" is a [[net]] user = true NIC (passt, then net-backend, MTU 65520);
# "qemu-user" is a VM with no [[net]], which QEMU gives its user-mode (slirp)
# network. Needs passt, python3 and a built workspace.
set -euo pipefail
rounds=${1:-3}
size=${2:-64}
here=$(cd "$(dirname "$0")/.." && pwd)
orch=$here/target/release/orchestrator
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT

head -c $((size << 20)) /dev/urandom > "$work/data"
want=$(md5sum < "$work/data" | cut -d' ' -f1)
port=18000
# GET sends the data; POST reads the body and answers with its MD5.
python3 - "$work/data" "$port" <<'EOF' &
import hashlib, http.server, sys
data = open(sys.argv[1], 'rb').read()
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.send_header('Content-Length', str(len(data))); self.end_headers()
        self.wfile.write(data)
    def do_POST(self):
        n = int(self.headers['Content-Length']); h = hashlib.md5(); left = n
        while left:
            b = self.rfile.read(min(left, 1 << 20)); h.update(b); left -= len(b)
        body = h.hexdigest().encode()
        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(('127.0.0.1', int(sys.argv[2])), H).serve_forever()
EOF
server=$!
sleep 1

mkdir -p "$work/share"
printf '[vm]\nname = "unb-passt"\n[[fs]]\nshared_dir = "%s"\ntag = "host"\n[[net]]\nuser = true\n' \
    "$work/share" > "$work/passt.toml"
printf '[vm]\nname = "unb-qemu"\n[[fs]]\nshared_dir = "%s"\ntag = "host"\n' \
    "$work/share" > "$work/qemu-user.toml"
# busybox wget posts a file as text, so the upload is the data in base64.
script="cd /tmp; s=\$(cat /proc/uptime); wget -q -O data http://10.0.2.2:$port/; e=\$(cat /proc/uptime); \
echo \"DOWN \${s%% *} \${e%% *} \$(md5sum < data | awk '{print \$1}') $want \$(wc -c < data)\"; \
base64 data > up; \
s=\$(cat /proc/uptime); got=\$(wget -q -O- --post-file=up http://10.0.2.2:$port/); e=\$(cat /proc/uptime); \
echo \"UP \${s%% *} \${e%% *} \$got \$(md5sum < up | awk '{print \$1}') \$(wc -c < up)\""

run() {
    local name=$1 out
    out=$(cd "$work/share" && "$orch" run -f "$work/$name.toml" -- "$script" 2>/dev/null)
    echo "$out" | awk -v n="$name" '
        /^(DOWN|UP) / {
            t = $3 - $2; mib = $NF / 1048576
            ok = ($4 == $5) ? "md5 ok" : "MD5 MISMATCH"
            printf "%-9s %-4s %6.1f MiB %6.2f s %7.1f MiB/s  %s\n", n, $1, mib, t, mib / t, ok
        }'
}

for r in $(seq "$rounds"); do
    if [ $((r % 2)) -eq 1 ]; then order="passt qemu-user"; else order="qemu-user passt"; fi
    for b in $order; do run "$b"; done
done
