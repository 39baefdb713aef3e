#!/usr/bin/env bash
# Install what is missing to build and test p2plive (Debian/Ubuntu).
#
# Idempotent: every package is checked with `dpkg -s` first, `apt-get update`
# runs only when something is missing, so a second run installs nothing and
# takes well under a second. The Rust toolchain is only checked, never
# downloaded: Debian's own rustc is too old for edition 2024, so a missing or
# old toolchain is reported with instructions and the script exits non-zero.
set -euo pipefail

cd "$(dirname "$0")/.."

# Minimum rustc: Cargo.toml's rust-version (edition 2024 needs >= 1.85).
MIN_RUST_MAJOR=1
MIN_RUST_MINOR=92

PACKAGES=(
    pkg-config
    build-essential
    libgstreamer1.0-dev
    libgstreamer-plugins-base1.0-dev
    gstreamer1.0-tools
    gstreamer1.0-plugins-base
    gstreamer1.0-plugins-good
    gstreamer1.0-plugins-bad
    gstreamer1.0-plugins-ugly
    gstreamer1.0-libav
    # X11 video sinks for autovideosink when the demo has a display; plugins-good only
    # recommends it, and recommends are not installed.
    gstreamer1.0-x
    meson
    ninja-build
    iproute2
    # scripts/netns-test.sh: NAT and firewall rules in the namespaces it creates.
    nftables
)

log() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

# --- system packages ---------------------------------------------------------

if [[ ! -r /etc/os-release ]]; then
    die "cannot read /etc/os-release; only Debian and Ubuntu are supported. Install by hand: ${PACKAGES[*]}"
fi
# shellcheck source=/dev/null
os_id=$(. /etc/os-release && printf '%s' "${ID:-}")
# shellcheck source=/dev/null
os_like=$(. /etc/os-release && printf '%s' "${ID_LIKE:-}")
case " ${os_id} ${os_like} " in
    *" debian "* | *" ubuntu "*) ;;
    *) die "unsupported distribution '${os_id}' (Debian/Ubuntu only). Install the equivalents of: ${PACKAGES[*]}" ;;
esac
command -v dpkg >/dev/null 2>&1 || die "dpkg not found on a '${os_id}' system"

# Node.js and npm run the js-libp2p interop test (tests/interop.rs). A machine that has them
# already (NodeSource's nodejs bundles npm, and conflicts with Debian's npm) keeps its own.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    PACKAGES+=(nodejs npm)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    # The package's dpkg status (what `dpkg -s` shows as Status:), read whole rather than
    # piped into `grep -q`, which can close the pipe early and, with pipefail, fail spuriously.
    # A removed-but-not-purged package reads "deinstall ok config-files".
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ $status != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    log "all ${#PACKAGES[@]} system packages already installed"
else
    log "missing packages: ${missing[*]}"
    as_root=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 || die "not root and sudo not found; as root run: apt-get install ${missing[*]}"
        as_root=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "running apt-get update"
    "${as_root[@]}" apt-get update -q
    log "running apt-get install ${missing[*]}"
    "${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    log "installed ${#missing[@]} package(s): ${missing[*]}"
fi

# --- Rust toolchain ------------------------------------------------------------

rust_help() {
    cat >&2 <<EOF
setup: p2plive needs Rust >= ${MIN_RUST_MAJOR}.${MIN_RUST_MINOR} (edition 2024) with cargo, rustfmt and clippy.
setup: Debian's packaged rustc is too old. Install a toolchain with rustup
setup: (https://rustup.rs, or Debian's 'rustup' package on trixie and later):
setup:     rustup toolchain install stable --component rustfmt,clippy
setup: then make sure ~/.cargo/bin is on PATH (e.g. 'source ~/.cargo/env').
EOF
}

if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
    if [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
        printf 'setup: error: cargo is installed in %s/.cargo/bin but not on PATH\n' "${HOME:-/root}" >&2
    else
        printf 'setup: error: cargo/rustc not found\n' >&2
    fi
    rust_help
    exit 1
fi

rustc_version=$(rustc --version)
if [[ ! $rustc_version =~ ^rustc\ ([0-9]+)\.([0-9]+)\.([0-9]+) ]]; then
    die "cannot parse '${rustc_version}'"
fi
major=${BASH_REMATCH[1]}
minor=${BASH_REMATCH[2]}
if ((major < MIN_RUST_MAJOR || (major == MIN_RUST_MAJOR && minor < MIN_RUST_MINOR))); then
    printf 'setup: error: %s is too old\n' "$rustc_version" >&2
    rust_help
    exit 1
fi
log "found ${rustc_version} ($(command -v rustc))"

for tool in fmt clippy; do
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        printf 'setup: error: cargo %s is not installed\n' "$tool" >&2
        rust_help
        exit 1
    fi
done
log "found cargo fmt and cargo clippy"

# --- GStreamer sanity ------------------------------------------------------------

pkg-config --atleast-version=1.22 gstreamer-1.0 ||
    die "GStreamer >= 1.22 development files not found by pkg-config (found: $(pkg-config --modversion gstreamer-1.0 2>/dev/null || echo none))"
log "found GStreamer $(pkg-config --modversion gstreamer-1.0)"
log "done"
