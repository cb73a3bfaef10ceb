"""CommNG: channels and messages, with database credentials that rotate without downtime.

The layout is the architecture: ``app`` (the factory), ``rotation`` (the reusable
credential-rotation layer), ``db`` and ``models`` (serving requests from PostgreSQL),
``api``, ``admin``, ``health``, ``errors``, ``cli`` and ``observability``. Importing the
package imports none of them, so ``commng_rotation`` can be used on its own.
"""
