#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ API headers (Debian trixie `libonnxruntime-dev`, ORT 1.21) into $1.
# A library built on these headers loads in newer PyPI ORT releases (docs/FACTS in shared/).
# Override the whole step with ORT_INCLUDE_DIR=/path/to/headers (e.g. a JetPack ORT build).
set -euo pipefail
dest=${1:?usage: fetch_ort_headers.sh DEST}
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -qq update
(cd "$work" && apt-get "${opts[@]}" -qq download libonnxruntime-dev)
dpkg -x "$work"/libonnxruntime-dev_*.deb "$dest"
test -f "$dest/usr/include/onnxruntime/onnxruntime_cxx_api.h" || { echo "ORT headers missing after fetch" >&2; exit 1; }
echo "ORT headers in $dest/usr/include/onnxruntime"
