"""cfgengine.export"""
