#!/bin/sh
# VM benchmark: median of N runs of cold boot vs snapshot restore of the tiny 3-VM cluster, until all 3 VMs
# answer HTTP with their own page. Needs root; runs the VMs in a private network namespace.
# Usage: sudo bench/vm.sh [RUNS] (FCDEV_ACCEL=auto|kvm|tcg)
set -eu
cd "$(dirname "$0")/.."
RUNS=${1:-5}
ACCEL=${FCDEV_ACCEL:-auto}
IMAGE=target/fcdev-test-images/tiny
cargo build --release --quiet --bin fcdev --example vm_bench
if [ ! -f "$IMAGE/image.toml" ]; then
  ./target/release/fcdev image build tiny --out "$IMAGE"
fi
if [ ! -d "$IMAGE/snapshot" ]; then
  ./target/release/fcdev image snapshot tiny --out "$IMAGE" --accel "$ACCEL"
fi
nproc | sed 's/^/cores: /'
./target/release/examples/vm_bench --runs "$RUNS" --image "$IMAGE" --accel "$ACCEL"
