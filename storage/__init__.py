"""rmac.storage"""
