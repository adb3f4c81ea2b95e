"""The tiers benchmark's report: goals read from the same-round ratios, met or not."""

from ubsmoe.bench.tiers import goal_verdicts, to_markdown


def _result(ubsmoe_flops: float, ubsmoe_time: float, hetlora_time: float) -> dict:
    def entry(flops_saved: float, time_saved: float) -> dict:
        tiers = {"0.25": {"train_flops": 60e9, "median_s": 0.6}, "1.0": {"train_flops": 100e9, "median_s": 0.9}}
        return {"tiers": tiers, "low_tier_reduction": {"train_flops": flops_saved, "step_time": 0.3,
                                                       "step_time_paired": time_saved,
                                                       "step_time_paired_quartiles": [time_saved - 0.02, time_saved + 0.02]}}
    return {"batch_size": 16, "max_length": 128, "threads": 2, "repeats": 11, "steps_per_turn": 3,
            "dropout": "checkpoint", "methods": {"ubsmoe": entry(ubsmoe_flops, ubsmoe_time),
                                                 "hetlora": entry(0.02, hetlora_time)}}


def test_goal_verdicts_follow_the_thresholds():
    assert goal_verdicts(_result(0.43, 0.36, 0.02)) == [
        "ubsmoe low tier, FLOPs: 43% against at least 40%: met",
        "ubsmoe low tier, step time: 36% against at least 35%: met",
        "hetlora low tier, step time: 2% against under 10%: met",
    ]
    lines = goal_verdicts(_result(0.39, 0.33, 0.12))
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["not met", "not met", "not met"]


def test_tiers_markdown_shows_the_rate_and_the_verdicts():
    text = to_markdown(_result(0.43, 0.33, 0.02))
    assert "| ubsmoe | β=0.25 | 60.0 G | 600 | 100 |" in text  # 60 GFLOP in 0.6 s
    assert "| ubsmoe | 43% | 30% | 33% [31%, 35%] |" in text
    assert "- ubsmoe low tier, step time: 33% against at least 35%: not met" in text
