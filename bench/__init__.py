"""cfgengine.bench"""
