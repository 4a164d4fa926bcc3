"""Harvest: send each image once to the teacher, paced and retried, and store every answer."""
