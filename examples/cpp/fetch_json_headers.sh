#!/usr/bin/env bash
# Fetch nlohmann/json (header-only, Debian's nlohmann-json3-dev) into $1, without root and without touching
# the system's apt state: the same private-lists approach as runtime/csrc/fetch_ort_headers.sh.
# Used by CMakeLists.txt only when no installed nlohmann_json is found (apt install nlohmann-json3-dev).
set -euo pipefail
dest=${1:?usage: fetch_json_headers.sh DEST}
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -qq update
(cd "$work" && apt-get "${opts[@]}" -qq download nlohmann-json3-dev)
dpkg -x "$work"/nlohmann-json3-dev_*.deb "$dest"
test -f "$dest/usr/include/nlohmann/json.hpp" || { echo "nlohmann/json.hpp missing after fetch" >&2; exit 1; }
echo "nlohmann/json headers in $dest/usr/include"
