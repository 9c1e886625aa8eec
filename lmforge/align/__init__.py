"""Preference alignment: reward models, PPO, DPO, rejection sampling."""
