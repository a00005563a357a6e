#!/bin/sh
# glidein-startup.sh: served by the bootstrap service; glidein-wrapper.sh checked its SHA-256
# against the signed envelope before running it.
#
# Exchanges the bootstrap token for the pilot credential (an IDTOKEN), brings HTCondor where the
# machine has none (a grid worker node: the release the bootstrap service serves, checked against the
# SHA-256 in the signed envelope), writes the HTCondor startd configuration, runs condor_master in the
# foreground, and when it ends (normal exit, idle shutdown, end of lifetime, a signal) uploads its
# stdout/stderr and the HTCondor logs. The wrapper powers the VM off afterwards (a grid job just ends).
#
# From the wrapper: GLIDEIN_LIB, GLIDEIN_WORKDIR, GLIDEIN_LOG, GLIDEIN_URL, GLIDEIN_ENVELOPE (the
# verified envelope body), GLIDEIN_INSTANCE_ID, and on EC2 GLIDEIN_IDENTITY (the signed instance identity
# document, sent with the exchange).
set -u
GLIDEIN_ME=glidein-startup
# shellcheck source=glidein-lib.sh
. "$GLIDEIN_LIB"
WORK=$GLIDEIN_WORKDIR
IID=$GLIDEIN_INSTANCE_ID
TOKEN=$(val token "$GLIDEIN_ENVELOPE")
X=$WORK/exchange
CONDOR=$WORK/condor
umask 077

# -- the exchange: bootstrap token -> pilot credential, upload token, this pilot's settings ------
code=$(http POST "$GLIDEIN_URL/bootstrap/exchange?instance_id=$IID" "$X" "Authorization: Bearer $TOKEN" "${GLIDEIN_IDENTITY:-}")
if [ "$code" != 200 ]; then
    glidein_log "STOP: token exchange refused (HTTP $code): $(val error "$X" 2>/dev/null)"
    upload_log "$GLIDEIN_LOG" glidein.log "$TOKEN" "$IID"
    exit 3
fi
UPLOAD=$(val upload_token "$X")
GLIDEIN_LOG_MAX=$(val log_max_bytes "$X")
export GLIDEIN_LOG_MAX
glidein_log "exchanged the bootstrap token; logs may be uploaded until $(val upload_expires "$X")"

# stop MESSAGE: say why, send this log home with the upload token, end.
stop() {
    glidein_log "STOP: $*"
    rm -f "$X"
    upload_log "$GLIDEIN_LOG" glidein.log "$UPLOAD"
    exit 4
}

# -- HTCondor: the machine's, or the release the factory serves (a worker node may have none) --------
RELEASE=""
if ! command -v condor_master >/dev/null 2>&1; then
    name=$(val condor_tarball "$GLIDEIN_ENVELOPE")
    want=$(val condor_tarball_sha256 "$GLIDEIN_ENVELOPE")
    [ -n "$name" ] && [ -n "$want" ] \
        || stop "no condor_master on this machine, and the factory serves no HTCondor release for entry $(val entry "$X") (options.condor_tarball)"
    tarball=$WORK/condor-release.tar.gz
    code=$(http GET "$GLIDEIN_URL/bootstrap/condor/$name.tar.gz" "$tarball" "Authorization: Bearer $UPLOAD")
    [ "$code" = 200 ] || stop "cannot fetch HTCondor release $name (HTTP $code): $(val error "$tarball" 2>/dev/null)"
    got=$(sha256 "$tarball")
    [ "$got" = "$want" ] || stop "HTCondor release $name has SHA-256 $got, the envelope says $want; not using it"
    mkdir -p "$WORK/release" && tar -xzf "$tarball" -C "$WORK/release" 2>>"$GLIDEIN_LOG" \
        || stop "cannot unpack HTCondor release $name"
    rm -f "$tarball"
    master=$(find "$WORK/release" -type f -name condor_master -path '*/sbin/*' | head -n 1)
    [ -n "$master" ] || stop "HTCondor release $name holds no sbin/condor_master"
    RELEASE=$(cd "$(dirname "$master")/.." && pwd)
    PATH=$RELEASE/sbin:$RELEASE/bin:$PATH
    export PATH
    glidein_log "HTCondor release $name ($got) unpacked in $RELEASE"
fi

mkdir -p "$CONDOR/log" "$CONDOR/spool" "$CONDOR/execute" "$CONDOR/lock" "$CONDOR/run" "$CONDOR/tokens.d"
val credential_b64 "$X" | b64d >"$CONDOR/tokens.d/pilot.idtoken"
[ -s "$CONDOR/tokens.d/pilot.idtoken" ] || glidein_log "warning: the launch has no pilot credential; the startd may not be able to join the pool"

# -- the startd configuration ------------------------------------------------------------------
collector=$(val collector "$X")
attrs=$(sed -n 's/^attr\.\([A-Za-z_][A-Za-z0-9_]*\)=.*$/\1/p' "$X" | tr '\n' ' ')
{
    printf '# Written by glidein-startup.sh for pilot %s\n' "$IID"
    printf 'LOCAL_DIR = %s\n' "$CONDOR"
    if [ -n "$RELEASE" ]; then
        printf 'RELEASE_DIR = %s\n' "$RELEASE"
        printf '%s = $(RELEASE_DIR)/%s\n' BIN bin SBIN sbin LIB lib LIBEXEC libexec
    fi
    cat <<'EOF'
LOG = $(LOCAL_DIR)/log
SPOOL = $(LOCAL_DIR)/spool
EXECUTE = $(LOCAL_DIR)/execute
LOCK = $(LOCAL_DIR)/lock
RUN = $(LOCAL_DIR)/run
DAEMON_LIST = MASTER, STARTD
# Cloud VMs sit behind NAT: reach the pool through CCB on the collector.
CCB_ADDRESS = $(COLLECTOR_HOST)
SEC_TOKEN_DIRECTORY = $(LOCAL_DIR)/tokens.d
SEC_DEFAULT_AUTHENTICATION_METHODS = IDTOKENS
SEC_CLIENT_AUTHENTICATION_METHODS = IDTOKENS
SEC_DEFAULT_AUTHENTICATION = REQUIRED
SEC_DEFAULT_ENCRYPTION = REQUIRED
SEC_DEFAULT_INTEGRITY = REQUIRED
EOF
    if [ -n "$collector" ]; then
        printf 'COLLECTOR_HOST = %s\n' "$collector"
    else
        printf '# no collector configured at the factory\n'
    fi
    printf 'NUM_CPUS = %s\n' "$(val cpus "$X")"
    printf 'MEMORY = %s\n' "$(val memory_mb "$X")"
    key=$(val pilot_key "$X")  # entry/instance id: provider ids collide across endpoints
    printf 'GLIDEIN_PILOT_ID = "%s"\n' "${key:-$IID}"
    printf 'GLIDEIN_Instance_ID = "%s"\n' "$IID"
    for k in entry:GLIDEIN_Entry_Name frontend:GLIDEIN_Frontend factory:GLIDEIN_Factory launch_id:GLIDEIN_Launch; do
        printf '%s = "%s"\n' "${k#*:}" "$(val "${k%%:*}" "$X")"
    done
    printf 'GLIDEIN_ToRetire = %s\n' "$(val to_retire "$X")"
    printf 'GLIDEIN_ToDie = %s\n' "$(val to_die "$X")"
    sed -n 's/^attr\.\([A-Za-z_][A-Za-z0-9_]*\)=\(.*\)$/\1 = \2/p' "$X"
    printf 'STARTD_ATTRS = $(STARTD_ATTRS) GLIDEIN_PILOT_ID GLIDEIN_Instance_ID GLIDEIN_Entry_Name GLIDEIN_Frontend GLIDEIN_Factory GLIDEIN_Launch GLIDEIN_ToRetire GLIDEIN_ToDie %s\n' "$attrs"
    printf 'START = (%s) && (time() < GLIDEIN_ToRetire)\n' "$(val start_expr "$X")"
    printf 'STARTD_NOCLAIM_SHUTDOWN = %s\n' "$(val idle_timeout "$X")"
    cat <<'EOF'
MAXJOBRETIREMENTTIME = GLIDEIN_ToDie - time()
STARTD.DAEMON_SHUTDOWN = time() > GLIDEIN_ToDie
# The master leaves when its startd has gone (idle shutdown, end of life).
MASTER.DAEMON_SHUTDOWN = STARTD_StartTime =?= 0
EOF
} >"$CONDOR/condor_config"
glidein_log "wrote $CONDOR/condor_config (collector ${collector:-none})"
to_die=$(val to_die "$X")
rm -f "$X"  # it held the credential (now only in tokens.d) and the upload token (kept in $UPLOAD)

# -- condor_master in the foreground, until it ends --------------------------------------------
stopped_by=""
CONDOR_CONFIG=$CONDOR/condor_config condor_master -f >"$WORK/condor_master.stdout" 2>"$WORK/condor_master.stderr" &
master=$!
trap 'stopped_by=signal; glidein_log "signal received: stopping condor_master"; kill -TERM "$master" 2>/dev/null' TERM INT HUP
# A hard stop in case the daemons ignore their own end of life.
(
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep $((to_die - $(date +%s) + 600)) &
    nap=$!
    wait "$nap" && kill -TERM "$master"
) </dev/null >/dev/null 2>&1 &
watchdog=$!
glidein_log "condor_master started (pid $master)"
wait "$master"
rc=$?
while kill -0 "$master" 2>/dev/null; do
    wait "$master"
    rc=$?
done
kill "$watchdog" 2>/dev/null
if [ -n "$stopped_by" ]; then
    why="stopped by a signal"
elif [ "$(date +%s)" -ge "$to_die" ]; then
    why="end of lifetime"
elif [ "$rc" -eq 0 ]; then
    why="normal exit (idle shutdown or retirement)"
else
    why="error"
fi
glidein_log "condor_master exited with status $rc: $why"

# -- logs home ------------------------------------------------------------------------------
upload_log "$WORK/condor_master.stdout" condor_master.stdout "$UPLOAD"
upload_log "$WORK/condor_master.stderr" condor_master.stderr "$UPLOAD"
for f in "$CONDOR"/log/*; do
    [ -f "$f" ] && upload_log "$f" "$(basename "$f")" "$UPLOAD"
done
upload_log "$GLIDEIN_LOG" glidein.log "$UPLOAD"
exit "$rc"
