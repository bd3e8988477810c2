#!/bin/sh
# A restart-loop service on a host without systemd, in one call: install the launcher (read on stdin)
# when it differs from the installed one, then bring the service to STATE with start-stop-daemon, and
# keep the log's logrotate configuration (root:root 0644; an empty LOGROTATE_TEXT removes it). One call
# instead of command + template (itself two: stat, then file or copy).
# A changed launcher restarts a running service. Prints "launcher=<changed|unchanged>
# service=<started|stopped|unchanged> logrotate=<changed|unchanged>"; in check mode it prints what it
# would do and changes nothing.
#   loop-service.sh STATE LAUNCHER PIDFILE CHECK_MODE LOGROTATE_PATH LOGROTATE_TEXT < launcher
#   STATE: started | restarted | stopped | absent
set -eu
state=$1 launcher=$2 pidfile=$3 check_mode=$4 logrotate=$5 logrotate_text=$6
new='' rotate_new=''

case "$state" in
    started | restarted | stopped | absent) ;;
    *) echo "loop-service.sh: state '$state' is not one of started, restarted, stopped, absent" >&2; exit 2 ;;
esac

running() { start-stop-daemon --status --pidfile "$pidfile"; }
stop() {
    [ "$check_mode" = True ] && return 0
    start-stop-daemon --stop --pidfile "$pidfile" --remove-pidfile --retry TERM/15/KILL/5 >/dev/null
}
start() {
    [ "$check_mode" = True ] && return 0
    start-stop-daemon --start --background --make-pidfile --pidfile "$pidfile" --startas "$launcher"
}

launcher_result=unchanged
if [ "$state" = absent ]; then
    cat >/dev/null
    [ -e "$launcher" ] && launcher_result=changed
else
    # Written next to the launcher and renamed over it: never a half-written launcher.
    new=$(mktemp "$launcher.XXXXXX")
    trap 'rm -f "$new"' EXIT
    cat >"$new"
    if ! cmp -s "$new" "$launcher" 2>/dev/null; then
        launcher_result=changed
        if [ "$check_mode" != True ]; then
            chmod 0755 "$new"
            mv "$new" "$launcher"
        fi
    fi
fi

service_result=unchanged
if running; then
    if [ "$state" != started ] || [ "$launcher_result" = changed ]; then
        stop
        service_result=stopped
    fi
fi
if [ "$state" = started ] || [ "$state" = restarted ]; then
    if [ "$service_result" = stopped ] || ! running; then
        start
        service_result=started
    fi
fi
if [ "$state" = absent ] && [ "$launcher_result" = changed ] && [ "$check_mode" != True ]; then
    rm -f "$launcher"
fi

logrotate_result=unchanged
if [ "$state" = absent ] || [ -z "$logrotate_text" ]; then
    if [ -e "$logrotate" ]; then
        logrotate_result=changed
        [ "$check_mode" = True ] || rm -f "$logrotate"
    fi
elif [ "$(stat -c '%a %u %g' "$logrotate" 2>/dev/null)" != "644 0 0" ] \
    || [ "$(cat "$logrotate")" != "$(printf '%s' "$logrotate_text")" ]; then
    # $(...) drops trailing newlines on both sides: the file is written with exactly one.
    logrotate_result=changed
    if [ "$check_mode" != True ]; then
        mkdir -p "${logrotate%/*}"
        rotate_new=$(mktemp "$logrotate.XXXXXX")
        trap 'rm -f "$new" "$rotate_new"' EXIT
        printf '%s\n' "$(printf '%s' "$logrotate_text")" >"$rotate_new"
        chown 0:0 "$rotate_new"
        chmod 0644 "$rotate_new"
        mv "$rotate_new" "$logrotate"
    fi
fi
echo "launcher=$launcher_result service=$service_result logrotate=$logrotate_result"
