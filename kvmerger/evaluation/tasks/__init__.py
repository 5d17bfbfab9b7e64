"""Evaluation tasks: each builds samples (context, question, answers) from shipped data and a seed."""
