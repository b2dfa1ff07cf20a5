"""Pure pieces of the training engine."""

from __future__ import annotations

import json

from geokd.engine import MetricsLog, epoch_order, linear_schedule, total_optimizer_steps


def test_total_optimizer_steps_rounds_micro_batches_up_before_accumulating():
    assert total_optimizer_steps(10, 4, 1, 1.0) == 3  # 3 micro-batches
    assert total_optimizer_steps(10, 4, 2, 1.0) == 2  # ceil(3 / 2)
    assert total_optimizer_steps(10, 4, 2, 3.0) == 5  # ceil(9 / 2), not 3 * floor(3 / 2) = 3
    assert total_optimizer_steps(1, 32, 8, 0.1) == 1


def test_epoch_order_is_a_pure_permutation_of_seed_and_epoch():
    a, b = epoch_order(50, 3, 0), epoch_order(50, 3, 0)
    assert a == b and sorted(a) == list(range(50))
    assert epoch_order(50, 3, 1) != a and epoch_order(50, 4, 0) != a


def test_linear_schedule_warms_up_then_decays_to_zero():
    f = linear_schedule(warmup_steps=4, total_steps=10)
    assert [round(f(i), 3) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(10) == 0.0 and 0 < f(7) < 1


def test_metrics_log_resume_truncation_skips_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 6)) + '{"step": 6, "lo'
    )
    MetricsLog(path, truncate_after_step=3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
