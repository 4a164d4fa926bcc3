"""Data: image files (scan, hash, decode), the pixel cache, and teacher answers turned into targets."""
