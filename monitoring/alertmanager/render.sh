#!/bin/sh
# Render the Alertmanager configuration from the environment, then optionally exec a command.
#
#   render.sh SRC_DIR OUT_DIR [COMMAND ARGS...]
#
# Renders SRC_DIR/alertmanager.yml and SRC_DIR/templates/*.tmpl into OUT_DIR:
#   #@ if NAME        keep the lines up to the matching "#@ end" only when NAME is set;
#   #|                at the start of a kept line: two spaces (the line is configuration, not
#                     a comment, so the unrendered file stays valid with nobody notified);
#   ${NAME}           the environment variable NAME (in YAML single quotes, ' is doubled);
#   #@ require NAME   stop with an error when NAME is empty (inside a kept block).
# POSIX sh and awk only: it runs in the prom/alertmanager (busybox) image and in the tests.
# In docker-compose.prod.yml it is the container's entrypoint, followed by
# /bin/alertmanager --config.file=OUT_DIR/alertmanager.yml ...
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: render.sh SRC_DIR OUT_DIR [COMMAND ARGS...]" >&2
    exit 2
fi
src=$1
out=$2
shift 2

render() {
    awk '
    function value(name) { return (name in ENVIRON) ? ENVIRON[name] : "" }
    function fail(message) { print "render.sh: " FILENAME ":" FNR ": " message > "/dev/stderr"; failed = 1; exit 1 }
    BEGIN { depth = 0; skipping = 0 }
    /^[ \t]*#@[ \t]*if[ \t]+[A-Z0-9_]+[ \t]*$/ {
        depth++
        name = $NF
        active[depth] = (value(name) != "")
        if (!active[depth]) skipping++
        next
    }
    /^[ \t]*#@[ \t]*end[ \t]*$/ {
        if (depth == 0) fail("#@ end without #@ if")
        if (!active[depth]) skipping--
        depth--
        next
    }
    /^[ \t]*#@[ \t]*require[ \t]+[A-Z0-9_]+[ \t]*$/ {
        if (!skipping && value($NF) == "") fail($NF " must be set")
        next
    }
    /^[ \t]*#@/ { fail("unknown directive: " $0) }
    {
        if (skipping) next
        line = $0
        if (substr(line, 1, 2) == "#|") line = "  " substr(line, 3)  # a kept line: "#|" stands for its indent
        result = ""
        while ((start = index(line, "${")) > 0) {
            rest = substr(line, start + 2)
            stop = index(rest, "}")
            if (stop == 0) fail("unterminated ${")
            name = substr(rest, 1, stop - 1)
            if (name !~ /^[A-Z][A-Z0-9_]*$/) fail("bad variable name: " name)
            v = value(name)
            if (v ~ /[\n\r]/) fail(name " contains a line break")
            escaped = ""
            while ((q = index(v, "\047")) > 0) { escaped = escaped substr(v, 1, q) "\047"; v = substr(v, q + 1) }
            result = result substr(line, 1, start - 1) escaped v
            line = substr(rest, stop + 1)
        }
        print result line
    }
    END { if (!failed && depth != 0) { print "render.sh: " FILENAME ": #@ if without #@ end" > "/dev/stderr"; exit 1 } }
    ' "$1" > "$2"
}

# A stack whose alerts reach nobody must not look healthy: no receiver, no Alertmanager
# (the container restarts with this line in its log, and WSBridgeExporterDown shows it).
if [ -z "${ALERTS_SNS_TOPIC_ARN:-}${ALERT_WEBHOOK_URL:-}${ALERT_SLACK_WEBHOOK_URL:-}${ALERT_EMAIL_TO:-}" ]; then
    echo "render.sh: no alert receiver is configured: set ALERTS_SNS_TOPIC_ARN (Terraform's SNS topic)," \
        "ALERT_WEBHOOK_URL, ALERT_SLACK_WEBHOOK_URL or ALERT_EMAIL_TO (monitoring/alertmanager/README.md)" >&2
    exit 1
fi
if [ -z "${ALERT_DEADMANSSWITCH_URL:-}" ]; then
    echo "render.sh: warning: ALERT_DEADMANSSWITCH_URL is not set: nothing outside this host notices" \
        "when it stops sending the WSBridgeWatchdog heartbeat" >&2
fi

mkdir -p "$out/templates"
render "$src/alertmanager.yml" "$out/alertmanager.yml"
for template in "$src"/templates/*.tmpl; do
    [ -e "$template" ] || continue
    render "$template" "$out/templates/$(basename "$template")"
done

if [ "$#" -gt 0 ]; then
    exec "$@"
fi
