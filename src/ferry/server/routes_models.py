"""``/v1/models`` and ``/v1/models/{id}``: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter

from ferry.engine.async_engine import AsyncEngine
from ferry.server.deps import Engine, State, check_model
from ferry.server.responses import ModelCard, ModelList
from ferry.server.state import ServerState

router = APIRouter()


def _card(state: ServerState, engine: AsyncEngine) -> ModelCard:
    return ModelCard(id=state.served_model_name or engine.model_name, created=state.created,
                     root=engine.model_name, max_model_len=engine.max_model_len)


@router.get("/v1/models")
async def list_models(state: State, engine: Engine) -> ModelList:
    return ModelList(data=[_card(state, engine)])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, state: State, engine: Engine) -> ModelCard:
    card = _card(state, engine)
    check_model(state, model_id)
    return card
