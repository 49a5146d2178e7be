#!/usr/bin/env bash
# Fetch a Debian (trixie) header package into DEST without root and without touching the system's apt state
# (private lists and cache), and check that HEADER (relative to DEST/usr/include) is there.
#   fetch_debian_headers.sh DEST libonnxruntime-dev onnxruntime/onnxruntime_cxx_api.h   # ORT 1.21 C/C++ API
#   fetch_debian_headers.sh DEST nlohmann-json3-dev nlohmann/json.hpp                   # examples/cpp
# A library built on ORT 1.21's headers loads in newer PyPI ORT releases (shared/docs/FACTS.md). Override the
# whole step with ORT_INCLUDE_DIR=/path/to/headers (e.g. a JetPack ORT build).
set -euo pipefail
dest=${1:?usage: fetch_debian_headers.sh DEST PACKAGE HEADER}
package=${2:?usage: fetch_debian_headers.sh DEST PACKAGE HEADER}
header=${3:?usage: fetch_debian_headers.sh DEST PACKAGE HEADER}
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -qq update
(cd "$work" && apt-get "${opts[@]}" -qq download "$package")
dpkg -x "$work"/"$package"_*.deb "$dest"
test -f "$dest/usr/include/$header" || { echo "$header missing after fetching $package" >&2; exit 1; }
echo "$package headers in $dest/usr/include"
