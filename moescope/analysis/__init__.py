"""What a profile says, in numbers with error bars: numpy only, never torch.

`balance` (how evenly experts are used), `uncertainty` (bootstrap intervals, unseen experts, sample
size), `specificity` (domain and language experts, co-activation), `criteria` (the registry of
importance scores), `tiers` (load tiers and their bit plan), `selection` (experts to prune), and
`analyse` (all of it for one profile, as `moescope stats` prints it)."""
