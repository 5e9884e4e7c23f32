#!/usr/bin/env bash
# Installs what Weir needs on a fresh Debian machine, and only what is missing.
#   scripts/install-deps.sh build   what building the server needs
#   scripts/install-deps.sh test    that, plus the real clients the tests drive
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-build}

# Building: C toolchain pieces for -sys crates (libopus is built from source by cmake).
build_pkgs=(pkg-config cmake g++)
# Testing: real clients: ffmpeg pushes and plays RTMP and decodes what Weir sends;
# Debian's Chromium and Firefox ESR (fake camera and microphone) are the browsers;
# a python3 makes the virtualenv of the second WebRTC stack (aiortc) below.
# coturn is the TURN server the relay-only browser test goes through; redis-server is
# the cluster tests' shared state (each test starts its own on a free port).
test_pkgs=(ffmpeg chromium firefox-esr coturn redis-server)
if ! command -v python3 >/dev/null; then test_pkgs+=(python3 python3-venv); fi
# Node.js runs the mini program client module's tests (signaling/miniprogram/test.js).
if ! command -v node >/dev/null; then test_pkgs+=(nodejs npm); fi

pkgs=("${build_pkgs[@]}")
if [ "$mode" = test ]; then
  pkgs+=("${test_pkgs[@]}")
fi

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo is missing; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi

# Testing drives a second WebRTC stack too: aiortc (Python, from PyPI, pinned), in a
# virtualenv the interop tests find at target/interop-venv.
if [ "$mode" = test ]; then
  venv=target/interop-venv
  if ! "$venv/bin/python" -c "import aiortc, websockets" 2>/dev/null \
      || ! cmp -s tests/interop/requirements.txt "$venv/requirements.txt"; then
    echo "install-deps: making $venv (aiortc)"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
      sudo=""
      if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv
      python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install -q --only-binary=:all: -r tests/interop/requirements.txt
    cp tests/interop/requirements.txt "$venv/requirements.txt"
  fi
fi

# An S3-compatible server for the recording upload tests: moto in server mode (PyPI,
# pinned), in its own virtualenv at target/s3-venv.
if [ "$mode" = test ]; then
  s3venv=target/s3-venv
  if ! "$s3venv/bin/python" -c "import moto.server, flask_cors" 2>/dev/null \
      || ! cmp -s tests/s3/requirements.txt "$s3venv/requirements.txt"; then
    echo "install-deps: making $s3venv (moto)"
    rm -rf "$s3venv"
    python3 -m venv "$s3venv"
    "$s3venv/bin/pip" install -q --only-binary=:all: -r tests/s3/requirements.txt
    cp tests/s3/requirements.txt "$s3venv/requirements.txt"
  fi
fi

# The Kubernetes manifests are validated offline against the API schemas that
# kubernetes-validate (PyPI, pinned) carries, in its own virtualenv at target/k8s-venv.
if [ "$mode" = test ]; then
  k8svenv=target/k8s-venv
  if ! "$k8svenv/bin/kubernetes-validate" --version >/dev/null 2>&1 \
      || ! cmp -s k8s/requirements.txt "$k8svenv/requirements.txt"; then
    echo "install-deps: making $k8svenv (kubernetes-validate)"
    rm -rf "$k8svenv"
    python3 -m venv "$k8svenv"
    "$k8svenv/bin/pip" install -q --only-binary=:all: -r k8s/requirements.txt
    cp k8s/requirements.txt "$k8svenv/requirements.txt"
  fi
fi

# The mini program module's tests need a WebSocket in Node: Node 22 has one, Node 20
# behind a flag; older ones (Debian's Node 18) get the `ws` package, pinned, in target/node.
if [ "$mode" = test ] \
    && ! node --experimental-websocket -e "process.exit(typeof WebSocket === 'function' ? 0 : 1)" 2>/dev/null \
    && [ ! -d target/node/node_modules/ws ]; then
  if ! command -v npm >/dev/null; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends npm
  fi
  echo "install-deps: installing ws for Node in target/node"
  npm install --prefix target/node --no-save --no-audit --no-fund ws@8.18.3
fi

# Testing also fuzzes every parser briefly: cargo-fuzz, from crates.io.
if [ "$mode" = test ] && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
