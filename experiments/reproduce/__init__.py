"""Reproduction study: does the TV term help? Plain U-Net vs TV-UNet on the phantom, paired seeds.

  python -m experiments.reproduce [--quick] [--out experiments/results] [--seeds 5]
      [--backend_check [--backend_check_seeds K]] [--sum_seeds K] [--budget_minutes M]

Modules: `plan` (variants, seed-major run order, resuming), `runs` (train one run, score its test
volumes), `stats` (paired bootstrap CI, verdict rule), `report` (tables, JSON, Markdown, figure),
`__main__` (the command). The recipe is `experiments/configs/study.py`.
"""
