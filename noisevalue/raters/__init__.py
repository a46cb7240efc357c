"""raters"""
