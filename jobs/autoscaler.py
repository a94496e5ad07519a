"""Spot first, on-demand when spot cannot be had: the node-type policy of ``cluster.yaml``.

Not a job: the Ray autoscaler on the head node imports it, through

    RAY_AUTOSCALER_UTILIZATION_SCORER=jobs.autoscaler.spot_first_scorer ray start --head ...

(``head_start_ray_commands`` in ``cluster.yaml``). ``cluster.yaml`` declares every instance kind
twice, ``<kind>-spot`` (``InstanceMarketOptions: {MarketType: spot}``) and ``<kind>-ondemand``.

Ray's autoscaler (v1, the one the cluster launcher runs on VMs) records every node type whose
launch failed (``InsufficientInstanceCapacity``, ``MaxSpotInstanceCountExceeded``,
``SpotMaxPriceTooLow``, ...) for 30 minutes (``AUTOSCALER_NODE_AVAILABILITY_MAX_STALENESS_S``) and
passes that record to the utilization scorer, whose default ignores it: a spot type without
capacity would be retried forever. This scorer keeps Ray's own score and ranks by

1. Ray's "no GPU node for CPU-only work" flag;
2. availability: a type whose last launch failed goes behind every type that did not fail;
3. Ray's utilization score (how well the pending bundles fill the node);
4. spot before on-demand when all else ties (the same instance type offered both ways).

So a spot launch that fails sends the next request to ``<kind>-ondemand`` until the record
expires, then spot is tried again. Imports nothing heavy (no torch): it runs in the autoscaler.
"""

from __future__ import annotations

from typing import Any

SPOT_SUFFIX = "-spot"


def spot_first_scorer(node_resources: dict, resources: list[dict], node_type: str, *,
                      node_availability_summary: Any) -> tuple | None:
    """A ``RAY_AUTOSCALER_UTILIZATION_SCORER``: higher tuples are launched first; None: cannot fit."""
    # Private on purpose: the scorer hook (RAY_AUTOSCALER_UTILIZATION_SCORER) is Ray's only way to rank
    # node types, and Ray publishes no API for its default score, which this keeps and refines. Imported
    # here, not at the top, so the module stays importable where that path moved. If Ray renames it,
    # tests/test_cluster.py::test_spot_first_then_on_demand_when_spot_fails fails.
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer

    score = _default_utilization_scorer(node_resources, resources, node_type,
                                        node_availability_summary=node_availability_summary)
    if score is None:
        return None
    gpu_ok, *utilization = score
    records = getattr(node_availability_summary, "node_availabilities", None) or {}
    record = records.get(node_type)
    available = record is None or bool(record.is_available)
    return (gpu_ok, available, *utilization, node_type.endswith(SPOT_SUFFIX))
