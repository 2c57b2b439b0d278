"""Experiments end to end: question sets, steering sweeps, ablation, transfer, persona
contrasts, resumable experiment folders, reports and `emgeo demo`."""
