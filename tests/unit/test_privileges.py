"""The pulse worker's rule for exec checks (``gorb.services.pulse_worker.privileges``): who may
switch users, read from the capability mask. The switch itself and the empty capability sets of
the check program are shown on a real kernel by ``tests/sandbox/test_least_privilege.py``."""

from __future__ import annotations

import pytest

from gorb.services.pulse_worker import privileges

STATUS = "Name:\tpython\nUid:\t999\t999\t999\t999\nCapInh:\t00000000000000c0\n" \
         "CapPrm:\t00000000000000c0\nCapEff:\t{eff}\nCapBnd:\t00000000000000c0\n"


@pytest.mark.parametrize("eff, mask", [("00000000000000c0", 0xC0), ("0000000000000000", 0),
                                       ("000001ffffffffff", 0x1FFFFFFFFFF)])
def test_effective_mask_is_read_from_status(eff, mask):
    assert privileges.effective_capabilities(STATUS.format(eff=eff)) == mask


@pytest.mark.parametrize("euid, eff, can", [
    (0, 0, True),            # root (capabilities of its own)
    (999, 0xC0, True),       # setuid + setgid, what gorb run gives a dropped worker
    (999, 1 << 7, False),    # setuid alone: cannot set the group, so no switch
    (999, 1 << 6, False),
    (999, 0, False),         # an ordinary user: the check runs as that user
    (999, 1 << 12, False),   # net_admin is not a way to switch users
])
def test_who_may_switch_users(euid, eff, can):
    assert privileges.can_switch_user(euid, eff) is can
