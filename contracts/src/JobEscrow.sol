// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {ProviderRegistry} from "./ProviderRegistry.sol";
import {ReputationRegistry} from "./ReputationRegistry.sol";

/// @title JobEscrow: deposits per job, settlement against the payer's signed vouchers.
/// @notice A payer deposits for a job. Each provider settles with the payer's latest EIP-712
/// voucher (cumulative amount acknowledged, Merkle root of the receipts it covers, nonce): it is
/// paid the increase since its last settlement, less the protocol fee. After the deadline the
/// payer takes back what was not paid. Two receipts a provider signed for the same step with
/// different outputs slash it. The EIP-712 domain ("gridmesh", "1", chain id, this address)
/// keeps signatures from being replayed on another chain or escrow.
contract JobEscrow is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    struct Receipt {
        bytes32 jobId;
        address provider;
        bytes32 model;
        uint32 layerStart;
        uint32 layerEnd;
        bytes32 session;
        uint64 step;
        bytes32 inputHash;
        bytes32 outputHash;
        uint64 units;
        uint256 pricePerUnit;
        bytes32 prevReceipt;
        uint64 timestamp;
    }

    struct Voucher {
        bytes32 jobId;
        address provider;
        uint256 cumulativeAmount;
        bytes32 receiptsRoot;
        uint64 nonce;
    }

    /// @dev Three storage slots: payer, deadline and refunded share one, deposit and paid another.
    struct Job {
        address payer;
        uint64 deadline;
        bool refunded;
        uint128 deposit;
        uint128 paid; // to all providers, fees included
        uint256 maxPricePerUnit;
    }

    /// @dev Per job and provider, two slots: what was paid and the voucher nonce share one.
    struct Account {
        uint192 paid; // cumulative, fees included (never above the job's uint128 deposit)
        uint64 nonce;
        bytes32 root;
    }

    bytes32 public constant RECEIPT_TYPEHASH = keccak256(
        "Receipt(bytes32 jobId,address provider,bytes32 model,uint32 layerStart,uint32 layerEnd,bytes32 session,uint64 step,bytes32 inputHash,bytes32 outputHash,uint64 units,uint256 pricePerUnit,bytes32 prevReceipt,uint64 timestamp)"
    );
    bytes32 public constant VOUCHER_TYPEHASH =
        keccak256("Voucher(bytes32 jobId,address provider,uint256 cumulativeAmount,bytes32 receiptsRoot,uint64 nonce)");
    uint16 public constant MAX_FEE_BPS = 1000;

    IERC20 public immutable token;
    ProviderRegistry public immutable providers;
    ReputationRegistry public immutable reputation;
    uint16 public immutable feeBps;
    address public immutable feeRecipient;

    mapping(bytes32 jobId => Job) public jobs;
    mapping(bytes32 jobId => mapping(address provider => Account)) private _accounts;

    error ZeroAddress();
    error ZeroAmount();
    error AmountTooLarge(uint256 amount, uint256 max);
    error FeeTooHigh(uint16 feeBps, uint16 max);
    error JobExists(bytes32 jobId);
    error UnknownJob(bytes32 jobId);
    error DeadlineInPast(uint64 deadline, uint256 now_);
    error DeadlinePassed(bytes32 jobId, uint64 deadline);
    error DeadlineNotReached(bytes32 jobId, uint64 deadline);
    error AlreadyRefunded(bytes32 jobId);
    error ProviderNotActive(address provider);
    error BadSignature();
    error StaleVoucher(uint64 nonce, uint64 lastNonce, uint256 cumulativeAmount, uint256 paid);
    error OverDeposit(bytes32 jobId, uint256 delta, uint256 remaining);
    error NotEquivocation();

    event Deposited(
        bytes32 indexed jobId, address indexed payer, uint256 amount, uint256 maxPricePerUnit, uint64 deadline
    );
    event Settled(
        bytes32 indexed jobId,
        address indexed provider,
        uint256 delta,
        uint256 fee,
        uint256 cumulativeAmount,
        bytes32 receiptsRoot,
        uint64 nonce
    );
    event Refunded(bytes32 indexed jobId, address indexed payer, uint256 amount);
    event EquivocationReported(
        bytes32 indexed jobId,
        address indexed provider,
        address indexed reporter,
        bytes32 session,
        uint64 step,
        bytes32 outputHashA,
        bytes32 outputHashB,
        uint256 slashed
    );

    constructor(
        IERC20 token_,
        ProviderRegistry providers_,
        ReputationRegistry reputation_,
        uint16 feeBps_,
        address feeRecipient_
    ) EIP712("gridmesh", "1") {
        if (
            address(token_) == address(0) || address(providers_) == address(0) || address(reputation_) == address(0)
                || feeRecipient_ == address(0)
        ) revert ZeroAddress();
        if (feeBps_ > MAX_FEE_BPS) revert FeeTooHigh(feeBps_, MAX_FEE_BPS);
        token = token_;
        providers = providers_;
        reputation = reputation_;
        feeBps = feeBps_;
        feeRecipient = feeRecipient_;
    }

    /// @notice Locks `amount` for `jobId` (used once), paid by msg.sender, until `deadline`.
    function deposit(bytes32 jobId, uint256 amount, uint256 maxPricePerUnit, uint64 deadline) external nonReentrant {
        if (jobs[jobId].payer != address(0)) revert JobExists(jobId);
        if (amount == 0) revert ZeroAmount();
        if (amount > type(uint128).max) revert AmountTooLarge(amount, type(uint128).max);
        if (deadline <= block.timestamp) revert DeadlineInPast(deadline, block.timestamp);
        jobs[jobId] = Job({
            payer: msg.sender,
            deadline: deadline,
            refunded: false,
            deposit: uint128(amount),
            paid: 0,
            maxPricePerUnit: maxPricePerUnit
        });
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit Deposited(jobId, msg.sender, amount, maxPricePerUnit, deadline);
    }

    /// @notice Pays `v.provider` what the payer's voucher acknowledges beyond what it was paid
    /// already, less the fee. Anyone may submit it; the money only ever goes to v.provider.
    function settle(Voucher calldata v, bytes calldata signature) external nonReentrant {
        uint256 delta = _acceptVoucher(v, signature);
        uint256 fee = (delta * feeBps) / 10_000;
        emit Settled(v.jobId, v.provider, delta, fee, v.cumulativeAmount, v.receiptsRoot, v.nonce);
        token.safeTransfer(v.provider, delta - fee);
        if (fee > 0) token.safeTransfer(feeRecipient, fee);
        reputation.recordSettlement(v.provider, delta);
    }

    /// @dev Every check of `settle` and all its state changes (effects before interactions);
    /// returns the amount newly acknowledged, fee included.
    function _acceptVoucher(Voucher calldata v, bytes calldata signature) private returns (uint256 delta) {
        Job storage job = jobs[v.jobId];
        address payer = job.payer;
        if (payer == address(0)) revert UnknownJob(v.jobId);
        if (block.timestamp > job.deadline) revert DeadlinePassed(v.jobId, job.deadline);
        if (!providers.isActive(v.provider)) revert ProviderNotActive(v.provider);
        if (!_signedBy(hashVoucher(v), signature, payer)) revert BadSignature();
        Account storage account = _accounts[v.jobId][v.provider];
        uint64 prevNonce = account.nonce;
        uint256 prevPaid = account.paid;
        if (v.nonce <= prevNonce || v.cumulativeAmount <= prevPaid) {
            revert StaleVoucher(v.nonce, prevNonce, v.cumulativeAmount, prevPaid);
        }
        delta = v.cumulativeAmount - prevPaid;
        uint256 remaining = job.deposit - job.paid;
        if (delta > remaining) revert OverDeposit(v.jobId, delta, remaining);
        // job.paid + delta <= deposit < 2**128 and cumulativeAmount <= that: both casts are exact
        job.paid += uint128(delta);
        account.paid = uint192(v.cumulativeAmount);
        account.nonce = v.nonce;
        account.root = v.receiptsRoot;
    }

    /// @notice After the deadline, once: what was not paid goes back to the payer.
    function refund(bytes32 jobId) external nonReentrant {
        Job storage job = jobs[jobId];
        address payer = job.payer;
        if (payer == address(0)) revert UnknownJob(jobId);
        if (block.timestamp <= job.deadline) revert DeadlineNotReached(jobId, job.deadline);
        if (job.refunded) revert AlreadyRefunded(jobId);
        uint256 remainder = job.deposit - job.paid;
        job.refunded = true;
        emit Refunded(jobId, payer, remainder);
        if (remainder > 0) token.safeTransfer(payer, remainder);
    }

    /// @notice Two receipts `a.provider` signed for one job, session and step with different
    /// outputs prove it lied: all its stake goes to the fee recipient and its reputation to zero.
    function reportEquivocation(Receipt calldata a, bytes calldata sigA, Receipt calldata b, bytes calldata sigB)
        external
        nonReentrant
    {
        if (
            a.jobId != b.jobId || a.provider != b.provider || a.session != b.session || a.step != b.step
                || a.outputHash == b.outputHash
        ) revert NotEquivocation();
        if (!_signedBy(hashReceipt(a), sigA, a.provider) || !_signedBy(hashReceipt(b), sigB, a.provider)) {
            revert BadSignature();
        }
        uint256 slashed = providers.slash(a.provider);
        reputation.recordSlash(a.provider);
        emit EquivocationReported(a.jobId, a.provider, msg.sender, a.session, a.step, a.outputHash, b.outputHash, slashed);
    }

    /// @notice True when `receiptDigest` (a receipt's EIP-712 digest) is a leaf under the root
    /// recorded by the provider's latest settlement for the job.
    function verifyReceipt(bytes32 jobId, address provider, bytes32 receiptDigest, bytes32[] calldata proof)
        external
        view
        returns (bool)
    {
        bytes32 root = _accounts[jobId][provider].root;
        return root != bytes32(0) && MerkleProof.verifyCalldata(proof, root, receiptDigest);
    }

    /// @notice Cumulative amount settled to `provider` for the job (fees included).
    function paid(bytes32 jobId, address provider) external view returns (uint256) {
        return _accounts[jobId][provider].paid;
    }

    /// @notice The nonce of the provider's latest settled voucher for the job.
    function lastNonce(bytes32 jobId, address provider) external view returns (uint64) {
        return _accounts[jobId][provider].nonce;
    }

    /// @notice Merkle root of the receipts covered by the provider's latest settled voucher.
    function rootOf(bytes32 jobId, address provider) external view returns (bytes32) {
        return _accounts[jobId][provider].root;
    }

    /// @notice What the payer has not been charged yet (zero once refunded).
    function remainingOf(bytes32 jobId) external view returns (uint256) {
        Job storage job = jobs[jobId];
        return job.refunded ? 0 : job.deposit - job.paid;
    }

    /// @notice The full EIP-712 digest of a receipt (what the provider signs).
    function hashReceipt(Receipt calldata r) public view returns (bytes32) {
        bytes32 structHash = keccak256(
            bytes.concat(
                abi.encode(
                    RECEIPT_TYPEHASH, r.jobId, r.provider, r.model, r.layerStart, r.layerEnd, r.session, r.step
                ),
                abi.encode(r.inputHash, r.outputHash, r.units, r.pricePerUnit, r.prevReceipt, r.timestamp)
            )
        );
        return _hashTypedDataV4(structHash);
    }

    /// @notice The full EIP-712 digest of a voucher (what the payer signs).
    function hashVoucher(Voucher calldata v) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(abi.encode(VOUCHER_TYPEHASH, v.jobId, v.provider, v.cumulativeAmount, v.receiptsRoot, v.nonce))
        );
    }

    /// @dev A malformed or malleable signature is false, never a revert of ECDSA's own.
    function _signedBy(bytes32 digest, bytes calldata signature, address expected) private pure returns (bool) {
        (address signer,,) = ECDSA.tryRecoverCalldata(digest, signature);
        return signer != address(0) && signer == expected;
    }
}
