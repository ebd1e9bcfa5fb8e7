"""Delivery channels for notifications to local authorities: signed webhooks and FHIR Communication."""
