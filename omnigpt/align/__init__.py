"""Alignment: from a pretrained model to an assistant (issue 6).

    data.py          JSONL readers (bad lines reported by number), chat encoding, SFT packing, batches
    modeling.py      policies, reward/value models (the LM with a scalar head), per-token log-probabilities
    loop.py          what the trainers share: torchrun/FSDP2, schedule, metrics, checkpoints and exact resume
    sft.py           supervised fine-tuning on demonstrations
    reward.py        Bradley-Terry reward model, K-way rankings expanded to all pairs in one batch element
    ppo.py           PPO with a per-token KL penalty (fixed or adaptive beta), GAE, value model, PPO-ptx
    dpo.py           direct preference optimization
    grpo.py          group relative policy optimization
    rollout.py       sampling through the inference engine, rewards, the verified score
    constitution.py  Constitutional AI: critique and revision, AI preference labels
    commands.py      `omnigpt align ...`
"""
