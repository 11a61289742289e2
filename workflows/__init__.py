"""rmac.workflows"""
