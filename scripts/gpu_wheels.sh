#!/usr/bin/env bash
# The wheels that AReaL 1.0.4's FSDP actor imports beyond the GPU machine's image, for
# `python -m benchmarks.gpu_acceptance` there (see /work/notes or the README: "GPU acceptance").
#
#   bash scripts/gpu_wheels.sh [DEST]        # DEST defaults to .whl (git-ignored); prints the sizes
#   PYVER=3.11 bash scripts/gpu_wheels.sh /tmp/whl311   # the same list for another Python (checks here)
#
# The image has Python 3.12, torch 2.11, transformers 5.17, numpy, pandas, pyarrow, aiohttp, peft, ...
# but no areal, no hydra. Building AReaL's FSDPPPOActor imports areal.trainer (its PPOActor), whose
# package __init__ imports every trainer, and with them datasets, ray, wandb, swanlab, trackio,
# openai, ... at module level. The list below is what those imports need and the image lacks, found
# by importing areal_a3po.actor and the harness in Python 3.12 + torch 2.11 + transformers 5.17 with
# only the image's packages besides (versions: those areal==1.0.4 resolves to, as in .venv).
#
# Three wheels are carried slim, their import-time code whole: ray without its Java jars, GCS server,
# raylet and dashboard front end (no Ray cluster is started: AReaL runs in SPMD mode), wandb without
# its Go core and helpers (no wandb run), botocore without its AWS service models (no S3 client).
# Unslimmed they are 75 + 19 + 16 MB, over the 64 MiB a device call may carry.
set -euo pipefail
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}
PYVER=${PYVER:-3.12}  # the GPU image's
WHEELS=(
  areal==1.0.4 hydra-core==1.4.0.dev1 omegaconf==2.4.0.dev2 antlr4-python3-runtime==4.13.2
  # areal.api / areal.engine / areal.infra
  colorlog==6.12.0 tenacity==9.2.1 flask==3.1.3 blinker==1.9.0 itsdangerous==2.2.0 torchdata==0.11.0
  lark==1.2.2 orjson==3.13.0 pybase64==1.5.1 ray==2.60.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
  openai==3.63.0 httpx2==2.17.0 sniffio==1.3.1 jiter==0.19.0
  # areal.trainer (the PPOActor module's package): datasets, stats loggers
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  swanlab==0.6.12 pyecharts==2.1.0 prettytable==3.19.0 pydantic-settings==2.16.3 python-dotenv==1.2.4
  boto3==1.44.18 botocore==1.44.18 s3transfer==0.19.3 jmespath==1.1.0 platformdirs==4.14.9
  trackio==0.43.0 gradio-client==2.7.2 uvicorn==0.55.0 starlette==1.10.0
  wandb==0.31.0 opentelemetry-api==1.45.2 tensorboardx==2.6.5
)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
"$PYTHON" - "$DEST" "${#WHEELS[@]}" <<'PY'
"""Slim ray, wandb and botocore in place (RECORD rewritten), check the count, print the sizes."""
import glob, os, re, sys, zipfile

dest, expected = sys.argv[1], int(sys.argv[2])
DROP = {
    "ray": re.compile(r"ray/(jars/|core/src/ray/gcs/gcs_server$|core/src/ray/raylet/raylet$|dashboard/client/build/)"),
    "wandb": re.compile(r"wandb/bin/"),
    "botocore": re.compile(r"botocore/data/[^/]+/"),  # the service models; endpoints.json etc. stay
}
for name, pattern in DROP.items():
    (path,) = glob.glob(os.path.join(dest, f"{name}-*.whl"))
    before = os.path.getsize(path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if pattern.match(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if not pattern.match(l.split(",", 1)[0])).encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(path + ".tmp", path)
    print(f"slimmed {os.path.basename(path)}: {before / 2**20:.1f} -> {os.path.getsize(path) / 2**20:.1f} MiB")
wheels = sorted(glob.glob(os.path.join(dest, "*.whl")))
if len(wheels) != expected:
    sys.exit(f"{dest} holds {len(wheels)} wheels, expected {expected}")
total = sum(os.path.getsize(w) for w in wheels)
print(f"{len(wheels)} wheels in {dest}: {total / 2**20:.1f} MiB")
PY
# What a device call carries besides: the tracked and untracked-not-ignored files (64 MiB in all).
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
whl=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "working tree $((tree / 1048576)) MiB + wheels $((whl / 1048576)) MiB = $(((tree + whl) / 1048576)) MiB of the 64 MiB a device call carries"
