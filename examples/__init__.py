"""
Example skynet services, ported from Go Skynet, and a client for each.
"""
