#!/usr/bin/env bash
# Training on a Cloud TPU VM slice (v4-32, v5e-64, ...): one process per TPU VM worker, all
# started by `gcloud compute tpus tpu-vm ssh --worker=all`; JAX finds the other workers from
# the TPU metadata (abaw_jax.parallel.initialize).
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE            # copy this checkout, install, on every worker
#   launch/tpu_pod.sh run TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_pod.sh stop TPU_NAME ZONE             # SIGTERM: save a checkpoint and exit
#
# WORKDIR and the records must be paths every worker sees (a Filestore/NFS mount, or a bucket
# mounted with gcsfuse at the same path on every worker). `run` again on the same WORKDIR
# resumes from the newest good checkpoint, e.g. after a preemptible slice was preempted
# (preemption sends SIGTERM: the workers agree on a step and save it first).
set -euo pipefail

usage() {
  echo "usage:" >&2
  sed -n '6,8p' "$0" | sed 's/^# */  /' >&2
  exit 2
}
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
remote_dir=${REMOTE_DIR:-abaw_jax}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"
}

case $action in
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    archive=$(mktemp --suffix=.tar.gz)
    # The committed tree: what is reproducible, without workdirs, caches or local data.
    git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$tpu":abaw_jax.tar.gz --zone="$zone" --worker=all
    rm -f "$archive"
    ssh_all "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf abaw_jax.tar.gz -C $remote_dir && cd $remote_dir && pip install -q -r requirements.txt 'jax[tpu]' -e ."
    ;;
  run)
    [[ $# -ge 2 ]] || usage
    config=$1 workdir=$2
    shift 2
    args=""
    if [[ $# -gt 0 ]]; then args=$(printf ' %q' "$@"); fi
    # Every worker also appends its output to ~/abaw_jax_run.log.
    main="python -m abaw_jax.main --config=$(printf %q "$config") --workdir=$(printf %q "$workdir")"
    ssh_all "set -o pipefail; cd $remote_dir && JAX_PLATFORMS=tpu $main$args 2>&1 | tee -a \$HOME/abaw_jax_run.log"
    ;;
  stop)
    # Anchored: the remote shell running this command line must not match.
    ssh_all "pkill -TERM -f '^python -m abaw_jax[.]main' || true"
    ;;
  *)
    usage
    ;;
esac
