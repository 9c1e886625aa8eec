"""Training: one loop for every stage, the optimizer and schedule, distributed wrappers, stages."""
