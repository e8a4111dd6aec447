"""notus-7b-v1 served the way it was trained: prompt building, streamed text, generation, weights.

Everything here runs without Cog; predict.py is the thin Cog adapter around it.
"""
