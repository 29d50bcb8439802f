"""(empty until its issue lands: see ../shared/DESIGN.md)"""
