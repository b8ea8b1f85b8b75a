"""The GraphQL gateway: queries, mutations and live subscriptions over FastAPI, with JWT auth and tenants."""
