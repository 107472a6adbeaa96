"""Concept assets: the folder format training writes (:mod:`caspec.assets.format`) and
``caspec assets list|show`` (:mod:`caspec.assets.inspect`)."""
