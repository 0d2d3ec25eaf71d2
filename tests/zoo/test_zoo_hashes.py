"""The zoo caches are keyed by config hashes: pin them so a refactor cannot silently change
what is built (a changed hash means a rebuild of every cached zoo, pool and expert).

When a recipe changes on purpose, update the pinned value in the same commit.
"""

import pytest

from evomerge.zoo import smollm2_experts as se
from evomerge.zoo import smollm2_pool as sp
from evomerge.zoo.build import zoo_spec
from evomerge.zoo.pool import pool_spec

ZOO = {
    "full": "cbd7580e0fcc004dd9174e0052a2fdc93129b75ff8fa1063db5674c4f22640eb",
    "test": "e942b3d34236ed3789b751176942bc3a33b14f222ddf1e3b76e6f3bff43edfc9",
}
POOL = {
    "full": "cc29c328923d13079dfdef720a25433c5c320e20cf02ca87664985b4c4715d99",
    "test": "1d676581ef2d8f3625ade2b85d8781d025b8527e48677437eeb6c28bf737d9fb",
}
SMOLLM2_POOL = "61755dfd7fd2e981df8fbc79d289cd378277c279a193bd8dbe114c2f7a82b06e"
# with the GGUF size pinned (the real hash covers the installed file's size)
EXPERTS = {"reverse": "61e45d2d372f", "upper": "485e4c473604", "maxdigit": "8771346dfde8"}


@pytest.mark.parametrize("variant", ["full", "test"])
def test_zoo_and_pool_hashes_are_pinned(variant):
    z, p = zoo_spec(variant), pool_spec(variant)
    assert z.config_hash() == ZOO[variant] and z.folder_name == f"{variant}-{ZOO[variant][:12]}"
    assert p.zoo_hash == ZOO[variant]
    assert p.config_hash() == POOL[variant] and p.folder_name == f"pool-{variant}-{POOL[variant][:12]}"


def test_smollm2_pool_and_expert_hashes_are_pinned(monkeypatch):
    assert sp.config_hash() == SMOLLM2_POOL and sp.pool_folder_name() == f"smollm2-pool-{SMOLLM2_POOL[:12]}"
    monkeypatch.setattr(se, "_gguf_bytes", lambda: 269_060_000)
    got = {s: se.expert_hash(s, se.DEMO_SKILLS, se.ExpertRecipe()) for s in se.DEMO_SKILLS}
    assert got == EXPERTS
