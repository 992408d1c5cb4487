#!/bin/sh
# PID 1 inside the user-mode-linux guest; the host side is gorb.services.launcher.uml (used by
# `gorb run`'s guest mode and by the tests' runner tests/sandbox/uml.py).
# The kernel hands unknown KEY=value boot parameters to us as environment variables:
#   GORB_SBX_DIR    host directory (read-write via hostfs) holding cmd.sh; we write rc + output there
#   GORB_SBX_MOUNTS host directories (":"-separated) mounted read-write at the same paths
#   GORB_SBX_CWD    where cmd.sh runs
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for d in /run /tmp /var/tmp /dev/shm; do mount -t tmpfs -o mode=1777 tmpfs "$d"; done
mkdir -p /run/netns
kver=$(uname -r)
# The host may have no /usr/lib/modules at all (and / is read-only), so give modprobe a
# root of its own under /run whose lib/modules/<kver> is the UML module tree.
mkdir -p /run/modroot/lib/modules
ln -s "/usr/lib/uml/modules/$kver" "/run/modroot/lib/modules/$kver"
# Host dirs are mounted after the tmpfs mounts so they stay visible even under /tmp.
IFS=:
for d in $GORB_SBX_DIR $GORB_SBX_MOUNTS; do
  [ -n "$d" ] || continue
  mkdir -p "$d" 2>/dev/null
  mount -t hostfs hostfs "$d" -o "$d" || echo "sandbox: cannot mount $d" >&2
done
unset IFS
ip link set lo up
for m in ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_lblc ip_vs_lblcr ip_vs_dh ip_vs_sh \
         ip_vs_sed ip_vs_nq ip_vs_fo ip_vs_ovf ip_vs_mh nf_conntrack veth dummy; do
  modprobe -d /run/modroot "$m" || echo "sandbox: modprobe $m failed" >&2
done
export HOME=/tmp TMPDIR=/tmp GORB_SANDBOX=1
cd "${GORB_SBX_CWD:-/}"
sh "$GORB_SBX_DIR/cmd.sh" >"$GORB_SBX_DIR/output" 2>&1
echo $? >"$GORB_SBX_DIR/rc"
sync
echo o >/proc/sysrq-trigger
busybox poweroff -f
