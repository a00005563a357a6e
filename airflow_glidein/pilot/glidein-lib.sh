# glidein-lib.sh: shell functions shared by glidein-wrapper.sh and the startup script.
# POSIX sh; needs curl or wget (GNU wget 1.15+), base64 or openssl or python3, sha256sum or openssl or python3.
# shellcheck shell=sh

# glidein_log MESSAGE...: to stderr (the journal, the console) and to $GLIDEIN_LOG (uploaded with the logs).
glidein_log() {
    _line="$(date -u +%Y-%m-%dT%H:%M:%SZ) ${GLIDEIN_ME:-glidein}: $*"
    printf '%s\n' "$_line" >&2
    [ -n "${GLIDEIN_LOG:-}" ] && printf '%s\n' "$_line" >>"$GLIDEIN_LOG"
    return 0
}

# val KEY FILE: the value of the first KEY=value line of FILE.
val() {
    sed -n "s/^$1=//p" "$2" | head -n 1
}

# http METHOD URL OUTFILE [HEADER] [BODYFILE]: prints the HTTP status, 000 when there was no answer.
# HEADER is one "Name: value" line. It goes through a mode-600 file (curl -H @file, a wgetrc for wget),
# so a token never shows in the process list. A 429 or 503 (the service is busy, or rate-limits us) is tried again after
# the Retry-After it names, GLIDEIN_HTTP_RETRIES times at most (default 4), waiting 60 s at most.
# https to a service with a private CA: GLIDEIN_CA_BUNDLE (default /etc/glidein/ca.pem, if it exists).
http() {
    _try=0
    while :; do
        _code=$(http_once "$@")
        case "$_code" in 429 | 503) ;; *) break ;; esac
        [ "$_try" -lt "${GLIDEIN_HTTP_RETRIES:-4}" ] || break
        _try=$((_try + 1))
        _wait=$(sed -n 's/^[Rr][Ee][Tt][Rr][Yy]-[Aa][Ff][Tt][Ee][Rr]: *\([0-9][0-9]*\).*/\1/p' "$3.rh" 2>/dev/null | tail -n 1)
        _wait=${_wait:-$((1 << _try))}
        [ "$_wait" -gt 60 ] && _wait=60
        glidein_log "HTTP $_code from $(printf '%s' "$2" | cut -d'?' -f1): trying again in $_wait s"
        sleep "$_wait"
    done
    rm -f "$3.rh"
    printf '%s\n' "$_code"
}

http_once() {
    _m=$1 _u=$2 _o=$3 _h=${4:-} _b=${5:-}
    _ca=${GLIDEIN_CA_BUNDLE:-/etc/glidein/ca.pem}
    [ -f "$_ca" ] || _ca=""
    if [ "${GLIDEIN_HTTP_CLIENT:-curl}" != wget ] && command -v curl >/dev/null 2>&1; then
        set -- curl -sS -g --connect-timeout "${GLIDEIN_CONNECT_TIMEOUT:-3}" -m "${GLIDEIN_HTTP_TIMEOUT:-120}" \
            -X "$_m" -o "$_o" -D "$_o.rh" -w '%{http_code}'
        [ -n "$_ca" ] && set -- "$@" --cacert "$_ca"
        if [ -n "$_h" ]; then
            (umask 077 && printf '%s\n' "$_h" >"$_o.hdr")
            set -- "$@" -H "@$_o.hdr"
        fi
        if [ -n "$_b" ]; then
            set -- "$@" -T "$_b"
        elif [ "$_m" = POST ] || [ "$_m" = PUT ]; then
            set -- "$@" -d ''
        fi
        _code=$("$@" "$_u" 2>>"${GLIDEIN_LOG:-/dev/null}")
        rm -f "$_o.hdr"
        printf '%s\n' "${_code:-000}"
    elif command -v wget >/dev/null 2>&1; then
        set -- wget -q -S -O "$_o" -T "${GLIDEIN_HTTP_TIMEOUT:-120}" -t 1 --content-on-error --method="$_m"
        [ -n "$_ca" ] && set -- "$@" --ca-certificate="$_ca"
        [ -n "$_b" ] && set -- "$@" --body-file="$_b"
        # the header (a token) goes through a mode-600 wgetrc, never on the command line
        (umask 077 && : >"$_o.wgetrc" && { [ -z "$_h" ] || printf 'header = %s\n' "$_h" >"$_o.wgetrc"; })
        WGETRC=$_o.wgetrc "$@" "$_u" 2>"$_o.err"
        rm -f "$_o.wgetrc"
        _code=$(sed -n 's/^ *HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' "$_o.err" | tail -n 1)
        sed -n 's/^ *\([Rr]etry-[Aa]fter:.*\)/\1/p' "$_o.err" >"$_o.rh"
        [ -n "${GLIDEIN_LOG:-}" ] && grep -v '^ ' "$_o.err" >>"$GLIDEIN_LOG"
        rm -f "$_o.err"
        printf '%s\n' "${_code:-000}"
    else
        glidein_log "neither curl nor wget is installed"
        printf '000\n'
    fi
}

# b64d: base64-decode stdin to stdout.
b64d() {
    if command -v base64 >/dev/null 2>&1; then
        base64 -d
    elif command -v openssl >/dev/null 2>&1; then
        openssl base64 -d -A
    else
        python3 -c 'import base64,sys; sys.stdout.buffer.write(base64.b64decode(sys.stdin.read()))'
    fi
}

# b64e: base64-encode stdin to stdout, one line.
b64e() {
    if command -v base64 >/dev/null 2>&1; then
        base64 | tr -d '\n'
    elif command -v openssl >/dev/null 2>&1; then
        openssl base64 -A
    else
        python3 -c 'import base64,sys; sys.stdout.write(base64.b64encode(sys.stdin.buffer.read()).decode())'
    fi
}

# sha256 FILE: the hex SHA-256 of FILE.
sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v openssl >/dev/null 2>&1; then
        openssl dgst -sha256 -r "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

# safe_id VALUE: succeeds when VALUE is a plain id (no path, no shell or config syntax).
safe_id() {
    case "$1" in
        "" | *[!A-Za-z0-9_.-]* | .*) return 1 ;;
    esac
    return 0
}

# upload_log FILE NAME TOKEN [INSTANCE_ID]: PUT the last $GLIDEIN_LOG_MAX bytes of FILE as NAME.
upload_log() {
    [ -s "$1" ] || return 0
    _name=$(printf '%s' "$2" | tr -c 'A-Za-z0-9_.-' '_' | sed 's/^[.]/_/')
    _part=$GLIDEIN_WORKDIR/upload.part
    tail -c "${GLIDEIN_LOG_MAX:-16777216}" "$1" >"$_part"
    _q=""
    [ -n "${4:-}" ] && _q="?instance_id=$4"
    _code=$(http PUT "$GLIDEIN_URL/bootstrap/logs/$_name$_q" "$_part.out" "Authorization: Bearer $3" "$_part")
    if [ "$_code" = 200 ]; then
        glidein_log "uploaded $_name"
    else
        glidein_log "upload of $_name refused (HTTP $_code): $(val error "$_part.out" 2>/dev/null)"
    fi
    rm -f "$_part" "$_part.out"
}
