#!/usr/bin/env bash
# Install everything ScaiGrid + ScaiBunker need on a Debian 12 host (run as root).
#   scripts/install.sh          runtime: Debian packages, .venv with the project
#   scripts/install.sh --test   also the test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  crun runc            # OCI runtimes for the container driver (crun preferred, runc fallback)
  debootstrap          # debootstrap image source (the default debian-12 image)
  e2fsprogs            # mkfs.ext4 for the size-capped writable layer
  busybox-static       # busybox-only test images
  zstd                 # .tar.zst image tarballs
  skopeo umoci         # OCI image sources: registry pull (skopeo) and layer unpack (umoci)
  docker-registry      # local registry the image tests push to and pull from
  iproute2 util-linux  # ip, mount, losetup, unshare, setpriv, nsenter, prlimit
  nftables python3-nftables conntrack  # bunker network policy (libnftables JSON API), flow log
  qemu-system-x86 qemu-utils linux-image-cloud-amd64 cpio lz4  # qemu microVM driver (TCG/KVM)
  gcc libc6-dev        # the agent runtime's static spawn helper (without it every exec
                       # forks the agent: ~1 ms more CPU); the tests' static stand-in agent
  python3-venv
)

if [ "$(id -u)" != 0 ]; then
  echo "scripts/install.sh must run as root (bunkers need namespaces, cgroups and mounts)" >&2
  exit 1
fi

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
