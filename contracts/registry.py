"""Type name -> model: the one place a message type is bound to its schema.

Each message model declares its own `TYPE`; this module only collects them, so adding a
version means writing the model and listing it here. It imports no envelope code, which
lets the envelope import it without a cycle.
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from contracts.batch import EventBatchV1
from contracts.cases import CaseOpenedV1, ProcessStepRetryV1
from contracts.control import StoreControlTotalsV1, StoreControlTotalsV2
from contracts.customer import CrmCustomerExportedV1, CustomerUpdatedV1, CustomerUpdatedV2
from contracts.erp import ErpReturnPostedV1, ErpSalePostedV1, ErpStockChangedV1, ErpStockChangesV1
from contracts.errors import ContractError
from contracts.fulfilment import (FulfilmentCollectedV1, FulfilmentPickedV1, FulfilmentTaskCancelledV1,
                                  FulfilmentTaskCreatedV1, FulfilmentTaskWithdrawnV1)
from contracts.inventory import InventoryReleasedV1, InventoryReservedV1, InventoryUnavailableV1
from contracts.journal import JournalHopsV1
from contracts.mastering import ConsentChangedV1, CustomerMasteredV1, CustomerMergedV1
from contracts.loyalty import (LoyaltyPointsAccruedV1, LoyaltyPointsReversedV1, LoyaltyRedemptionAuthorizedV1,
                               LoyaltyRedemptionCapturedV1, LoyaltyRedemptionReleasedV1, LoyaltySettlementV1)
from contracts.ops import RouteTableAppliedV1
from contracts.order_process import (CrmOrderRecordedV1, CrmRecordOrderV1, ErpCommitOrderV1, ErpFulfilOrderV1,
                                     ErpOrderCommittedV1, ErpOrderFulfilledV1, ErpOrderReversedV1, ErpReleaseStockV1,
                                     ErpReserveStockV1, ErpReverseOrderV1, LoyaltyAccrueOrderV1, LoyaltyCapturePointsV1,
                                     LoyaltyHoldPointsV1, LoyaltyOrderAccruedV1, LoyaltyRedemptionRefusedV1,
                                     LoyaltyReleasePointsV1, OrderCloseV1)
from contracts.process import ProcessStepFailedV1
from contracts.returns import (CrmRecordReturnV1, CrmReturnRecordedV1, ErpPostReturnV1, LoyaltyReturnPointsBookedV1,
                               LoyaltyReturnPointsV1)
from contracts.orders import OrderCancelledV1, OrderCancelRequestedV1, OrderCollectedV1, OrderPlacedV1
from contracts.pos import PosReturnV1, PosSaleV1, PosStockQueryV1

# Dotted lower-case name whose last segment is the version: `pos.sale.v1`.
TYPE_NAME_PATTERN = r"^[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*\.v[1-9][0-9]*$"

_MODELS: tuple[type[BaseModel], ...] = (
    PosSaleV1,
    PosReturnV1,
    PosStockQueryV1,
    ErpSalePostedV1,
    ErpReturnPostedV1,
    ErpStockChangedV1,
    ErpStockChangesV1,
    CustomerUpdatedV1,
    CustomerUpdatedV2,
    CrmCustomerExportedV1,
    CustomerMasteredV1,
    CustomerMergedV1,
    ConsentChangedV1,
    LoyaltyPointsAccruedV1,
    LoyaltyPointsReversedV1,
    LoyaltyRedemptionAuthorizedV1,
    LoyaltyRedemptionCapturedV1,
    LoyaltyRedemptionReleasedV1,
    LoyaltySettlementV1,
    RouteTableAppliedV1,
    EventBatchV1,
    JournalHopsV1,
    StoreControlTotalsV1,
    StoreControlTotalsV2,
    CaseOpenedV1,
    ProcessStepRetryV1,
    ProcessStepFailedV1,
    ErpPostReturnV1,
    LoyaltyReturnPointsV1,
    LoyaltyReturnPointsBookedV1,
    CrmRecordReturnV1,
    CrmReturnRecordedV1,
    OrderPlacedV1,
    OrderCancelRequestedV1,
    OrderCollectedV1,
    OrderCancelledV1,
    InventoryReservedV1,
    InventoryReleasedV1,
    InventoryUnavailableV1,
    FulfilmentTaskCreatedV1,
    FulfilmentTaskCancelledV1,
    FulfilmentPickedV1,
    FulfilmentCollectedV1,
    FulfilmentTaskWithdrawnV1,
    ErpReserveStockV1,
    ErpReleaseStockV1,
    ErpCommitOrderV1,
    ErpOrderCommittedV1,
    ErpReverseOrderV1,
    ErpOrderReversedV1,
    ErpFulfilOrderV1,
    ErpOrderFulfilledV1,
    LoyaltyHoldPointsV1,
    LoyaltyRedemptionRefusedV1,
    LoyaltyCapturePointsV1,
    LoyaltyReleasePointsV1,
    LoyaltyAccrueOrderV1,
    LoyaltyOrderAccruedV1,
    CrmRecordOrderV1,
    CrmOrderRecordedV1,
    OrderCloseV1,
)

REGISTRY: dict[str, type[BaseModel]] = {model.TYPE: model for model in _MODELS}


def types() -> list[str]:
    return sorted(REGISTRY)


def model_for(type_name: str) -> type[BaseModel]:
    try:
        return REGISTRY[type_name]
    except KeyError:
        raise ContractError(
            f"unknown message type {type_name!r}; known: {', '.join(types())}",
            [("type", f"unknown message type {type_name!r}")],
        ) from None


def parse(type_name: str, data: Any, context: dict | None = None) -> BaseModel:
    """Validate `data` as `type_name`; error paths start with `data.` as in the envelope.
    `context`: pydantic's validation context (e.g. `{"limits": contracts.pos.Limits}`)."""
    model = model_for(type_name)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ContractError.from_validation(exc, type_name, prefix="data") from None


def json_schema(type_name: str) -> dict[str, Any]:
    return model_for(type_name).model_json_schema()


def base_and_version(type_name: str) -> tuple[str, int]:
    """Split `pos.sale.v1` into (`pos.sale`, 1) so consumers can serve several versions."""
    if not re.fullmatch(TYPE_NAME_PATTERN, type_name):
        raise ContractError(
            f"bad message type name {type_name!r}: expected e.g. 'pos.sale.v1'",
            [("type", "not a dotted lower-case name ending in .v<N>")],
        )
    base, _, version = type_name.rpartition(".v")
    return base, int(version)
