"""rmac.ops"""
