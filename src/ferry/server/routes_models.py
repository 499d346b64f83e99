"""``/v1/models`` and ``/v1/models/{id}``: the one model this server serves, one card per served
name (``--served-model-name A B``: both listed, as vLLM)."""

from __future__ import annotations

from fastapi import APIRouter

from ferry.engine.async_engine import AsyncEngine
from ferry.server.deps import Engine, State, check_model
from ferry.server.responses import ModelCard, ModelList
from ferry.server.state import ServerState

router = APIRouter()


def _card(state: ServerState, engine: AsyncEngine, name: str) -> ModelCard:
    return ModelCard(id=name, created=state.created, root=engine.model_name,
                     max_model_len=engine.max_model_len)


@router.get("/v1/models")
async def list_models(state: State, engine: Engine) -> ModelList:
    return ModelList(data=[_card(state, engine, name) for name in state.served_model_names])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, state: State, engine: Engine) -> ModelCard:
    check_model(state, model_id)
    return _card(state, engine, model_id)
