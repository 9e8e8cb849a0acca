"""
skynet: massively distributed services on Twisted, byte compatible with Go
Skynet.
"""
