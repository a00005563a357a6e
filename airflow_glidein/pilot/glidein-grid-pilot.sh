#!/bin/sh
# glidein-grid-pilot.sh: the executable of a grid pilot (HTCondor-G's condor, arc and batch grid types),
# installed with the package and transferred with each job by the factory (airflow_glidein/hooks/htcondor_g.py).
#
# A grid job lands on a worker node we did not build: no image, no image key, no metadata service, and
# often no HTCondor. It runs in the job's scratch directory, where the factory's transferred files are:
#   glidein.envelope   the signed envelope (the launch's bootstrap token is in it: it travels only as this
#                      file's contents, never as an argument, in the environment or in a job attribute)
#   factory.pub        the factory's public key, to check the envelope's signature
#   glidein-wrapper.sh, glidein-lib.sh, ed25519_verify.py   the wrapper VMs run, and what it needs
# Its one argument is its id: the factory schedd's cluster.proc (the envelope names the entry, which
# qualifies it). It runs the wrapper on the envelope file; the wrapper checks the signature and the startup
# script, which exchanges the token, brings HTCondor from the bootstrap service where the node has none
# (checked by the SHA-256 in the envelope), runs the startd until it ends and sends the logs home. All of
# it stays in the scratch directory, and nothing is powered off: when it ends, the job ends.
#
# Usage: glidein-grid-pilot.sh CLUSTER.PROC
set -u
scratch=${_CONDOR_SCRATCH_DIR:-$(pwd)}
say() {
    printf '%s glidein-grid-pilot: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}
case "${1:-}" in
    "" | *[!0-9.]* | .* | *.) say "usage: $0 CLUSTER.PROC (the factory's job id); got '${1:-}'"; exit 2 ;;
esac
for f in glidein.envelope factory.pub glidein-wrapper.sh glidein-lib.sh ed25519_verify.py; do
    [ -f "$scratch/$f" ] || { say "the job's input file $f is missing from $scratch"; exit 2; }
done
say "pilot $1 in $scratch"
# Everything the wrapper reads or writes is here: a site's /etc/glidein is not the factory's.
GLIDEIN_WRAPPER_CONF=$scratch/glidein-wrapper.conf
GLIDEIN_LIB=$scratch/glidein-lib.sh
GLIDEIN_WORKDIR=$scratch/glidein
GLIDEIN_PUBKEY_FILE=$scratch/factory.pub
GLIDEIN_PUBKEY_DIR=$scratch/factory.pub.d
GLIDEIN_USERDATA_KEY=$scratch/no-image-key
GLIDEIN_POWEROFF=no
export GLIDEIN_WRAPPER_CONF GLIDEIN_LIB GLIDEIN_WORKDIR GLIDEIN_PUBKEY_FILE GLIDEIN_PUBKEY_DIR GLIDEIN_USERDATA_KEY \
    GLIDEIN_POWEROFF
exec sh "$scratch/glidein-wrapper.sh" "$scratch/glidein.envelope" "$1"
