"""The honest scorer the cheats are measured against: honest.py's bigram, as it is."""
import honest as h

h.honest(h.request())
